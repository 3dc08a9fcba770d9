"""A TFDS builder that writes a fixed split of the procedural tasks to array_record files.

For users who want a static, inspectable dataset on disk instead of generating examples
on the fly. No tensorflow needed: files are array_record, written by a
`GeneratorBasedBuilder` and read back with `tfds.data_source` (random access, numpy).
`tfds.load` (tf.data) would need tensorflow -- don't use it here.

    name = tfds_tasks.write_static_split(data_dir, "image", difficulty=2, seed=1234,
                                         num_train=4096, num_eval=128)
    source = tfds_tasks.load_static_split(data_dir, "image", "train")   # Examples
    it = data.example_iterator(source, seed=0, shuffle=True)            # grain pipeline

Splits (one builder config per capability + difficulty + seed + sizes):
  train: toy_tasks.make_example(cap, i, split="train") for i < num_train, i.e. the first
         num_train elements of toy_tasks.train_stream(cap, seed=seed, ...);
  eval:  toy_tasks.eval_set(cap, num_eval, seed=seed, ...), the held-out set.
Features: index (int64, the make_example index), capability, question, answer, solution
(text) and, for image and video configs only, frames float32[F, H, W, 3] (F = 1 for
image, num_frames for video). Text configs have no frames feature at all (not a zero
tensor), matching examples_lib.Example.frames = None. Records are stored in index order
(disable_shuffling), so source[i] is example i.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from copd_jax.data import examples as examples_lib, toy_tasks

DATASET_NAME = "copd_tasks"  # tfds' snake_case name of CopdTasks
FILE_FORMAT = "array_record"  # random access without tensorflow
DEFAULTS = dict(seed=1234, image_size=32, num_frames=4, num_train=4096, num_eval=128)


@dataclasses.dataclass
class TaskSplitConfig(tfds.core.BuilderConfig):
  """Which task, and how many examples of each split, a CopdTasks config writes."""
  capability: str = "text"
  difficulty: int = 2
  seed: int = DEFAULTS["seed"]
  image_size: int = DEFAULTS["image_size"]
  num_frames: int = DEFAULTS["num_frames"]
  num_train: int = DEFAULTS["num_train"]
  num_eval: int = DEFAULTS["num_eval"]

  def validate(self) -> None:
    # make_example checks capability, difficulty, sizes and seed, with field names.
    toy_tasks.make_example(self.capability, 0, seed=self.seed, difficulty=self.difficulty,
                       image_size=self.image_size, num_frames=self.num_frames)
    for field in ("num_train", "num_eval"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TaskSplitConfig.{field} must be an integer >= 1, got {value!r}")

  def frames_shape(self) -> tuple[int, int, int, int] | None:
    """float32 frames shape of one example, None for text."""
    modality = toy_tasks.FAMILIES[self.capability].modality
    if modality == "text":
      return None
    count = 1 if modality == "image" else self.num_frames
    return (count, self.image_size, self.image_size, 3)


def config_name(capability: str, *, difficulty: int, seed: int = DEFAULTS["seed"],
                image_size: int = DEFAULTS["image_size"], num_frames: int = DEFAULTS["num_frames"],
                num_train: int = DEFAULTS["num_train"], num_eval: int = DEFAULTS["num_eval"]) -> str:
  """'image_d2' for the default seed and sizes; otherwise every parameter is in the name,
  so two different splits can never share a directory."""
  params = dict(seed=seed, image_size=image_size, num_frames=num_frames,
                num_train=num_train, num_eval=num_eval)
  if params == DEFAULTS:
    return f"{capability}_d{difficulty}"
  return (f"{capability}_d{difficulty}_seed{seed}_img{image_size}_f{num_frames}"
          f"_train{num_train}_eval{num_eval}")


def make_config(capability: str, *, difficulty: int, **params: Any) -> TaskSplitConfig:
  """A validated TaskSplitConfig named by config_name (params: see DEFAULTS)."""
  unknown = set(params) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"unknown TaskSplitConfig parameters {sorted(unknown)}; "
                     f"known: {sorted(DEFAULTS)}")
  full = {**DEFAULTS, **params}
  config = TaskSplitConfig(
      name=config_name(capability, difficulty=difficulty, **full),
      description=f"{capability} tasks at difficulty {difficulty}: {full}",
      capability=capability, difficulty=difficulty, **full)
  config.validate()
  return config


class CopdTasks(tfds.core.GeneratorBasedBuilder):
  """The procedural copd-jax tasks, one config per capability + difficulty (+ seed, sizes)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: train prefix and held-out eval set."}
  BUILDER_CONFIGS = [make_config(cap, difficulty=d) for cap in toy_tasks.CAPABILITIES
                     for d in range(toy_tasks.MAX_DIFFICULTY + 1)]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup probes `importlib_resources` (not installed without tensorflow's
    # extras) for any builder inside an installed package; this file is the answer.
    return epath.Path(__file__)

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # array_record by default: tfds' own default (tfrecord) needs tensorflow to write.
    super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config: TaskSplitConfig = self.builder_config
    features = dict(index=tfds.features.Scalar(dtype=np.int64),
                    capability=tfds.features.Text(), question=tfds.features.Text(),
                    answer=tfds.features.Text(), solution=tfds.features.Text())
    if config.frames_shape() is not None:
      features["frames"] = tfds.features.Tensor(shape=config.frames_shape(), dtype=np.float32)
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True)  # record i is example i

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: examples are generated
    config: TaskSplitConfig = self.builder_config
    config.validate()
    return {"train": self._generate_examples("train", config.num_train),
            "eval": self._generate_examples("eval", config.num_eval)}

  def _generate_examples(self, split: str, count: int):
    config: TaskSplitConfig = self.builder_config
    for index in range(count):
      example = toy_tasks.make_example(
          config.capability, index, seed=config.seed, difficulty=config.difficulty,
          image_size=config.image_size, num_frames=config.num_frames, split=split)
      record = dict(index=index, capability=example.capability, question=example.question,
                    answer=example.answer, solution=example.solution)
      if example.frames is not None:
        record["frames"] = np.asarray(example.frames, np.float32)
      yield index, record


def write_static_split(data_dir: str | os.PathLike, capability: str, *, difficulty: int,
                       **params: Any) -> str:
  """Writes (or finds already written) train + eval splits under data_dir; returns the
  config name. params: seed, image_size, num_frames, num_train, num_eval (DEFAULTS)."""
  config = make_config(capability, difficulty=difficulty, **params)
  # A predefined config must be named, not passed as an equal copy (tfds refuses that).
  known = config.name in CopdTasks.builder_configs
  builder = CopdTasks(data_dir=os.fspath(data_dir), config=config.name if known else config,
                      file_format=FILE_FORMAT)
  builder.download_and_prepare(file_format=FILE_FORMAT)
  return config.name


def _config_dirs(data_dir: str, capability: str) -> list[str]:
  root = os.path.join(data_dir, DATASET_NAME)
  if not os.path.isdir(root):
    return []
  return sorted(name for name in os.listdir(root)
                if name.startswith(f"{capability}_d") and os.path.isdir(os.path.join(root, name)))


class StaticSplitSource:
  """Random-access source of examples_lib.Example over one written split (plugs into
  data.example_iterator). Each record is checked as it is read; a bad one raises an
  error naming the dataset directory, split and index."""

  def __init__(self, records, *, capability: str, where: str):
    self._records, self.capability, self._where = records, capability, where

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> examples_lib.Example:
    record = self._records[index]
    try:
      text = {k: _text(record[k]) for k in ("capability", "question", "answer", "solution")}
      if text["capability"] != self.capability:
        raise ValueError(f"capability {text['capability']!r}, expected {self.capability!r}")
      if int(record["index"]) != index:  # records are written in index order
        raise ValueError(f"holds example {int(record['index'])}, expected {index}")
      modality = (None if self.capability in toy_tasks.CAPABILITIES
                  else toy_tasks.FAMILIES[self.capability].modality)
      return examples_lib.Example(frames=record.get("frames"), modality=modality, **text)
    except KeyError as err:
      raise ValueError(f"{self._where}: bad record {index}: missing field {err}") from err
    except (ValueError, UnicodeDecodeError) as err:
      raise ValueError(f"{self._where}: bad record {index}: {err}") from err

  def __repr__(self) -> str:
    return f"StaticSplitSource({self._where}, len={len(self)})"


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_static_split(data_dir: str | os.PathLike, capability: str, split: str, *,
                      config: str | None = None) -> StaticSplitSource:
  """The split written by write_static_split, via tfds.data_source, as examples.Example objects.

  config: the config name write_static_split returned; None = the only config of this
  capability under data_dir (an error lists them if there are several).
  """
  data_dir = os.fspath(data_dir)
  if capability not in toy_tasks.FAMILIES:
    raise ValueError(f"capability must be one of {toy_tasks.FAMILY_NAMES}, got {capability!r}")
  if split not in toy_tasks.SPLITS:
    raise ValueError(f"split must be one of {toy_tasks.SPLITS}, got {split!r}")
  if config is None:
    found = _config_dirs(data_dir, capability)
    if len(found) != 1:
      raise ValueError(f"{'no' if not found else 'several'} {capability} datasets under "
                       f"{os.path.join(data_dir, DATASET_NAME)}{': ' + ', '.join(found) if found else ''}; "
                       f"write one with write_static_split or pass config=")
    config = found[0]
  elif not config.startswith(f"{capability}_d"):
    raise ValueError(f"config {config!r} is not a {capability} config of {DATASET_NAME}")
  where = os.path.join(data_dir, DATASET_NAME, config) + f" [{split}]"
  if not os.path.isdir(os.path.join(data_dir, DATASET_NAME, config)):
    raise FileNotFoundError(f"no static dataset at {where}; write it first with "
                            f"tfds_tasks.write_static_split")
  # download=False: reading never generates; a missing split is an error, not a rebuild.
  records = tfds.data_source(f"{DATASET_NAME}/{config}", split=split, data_dir=data_dir,
                             download=False)
  return StaticSplitSource(records, capability=capability, where=where)
