"""grain input pipelines: checkpointable, per-process-sharded streams of examples_lib.Example.

Every training stream in copd-jax is a grain `MapDataset` over a random-access source.
The trainer reads it through an `IndexedStream` (`make_streams`): positions are reserved
for the whole global batch on every process, and each process loads only the examples
its devices hold. Its `get_state()` / `set_state()` (a small JSON dict, as grain's
iterators have) let a checkpoint hold the exact data position. Batched pipelines (the
warm-start mixture) go on to grain `IterDataset`s.

    source (TaskSource | datasets.RecordSource | tfds_tasks.load_static_split)
      -> seed -> [shuffle] -> repeat -> slice(shard_index::shard_count)   (MapDataset)
      -> IndexedStream (training)  |  to_iter_dataset -> [batch] (IterDataset)

- Procedural task streams (TaskSource) are NOT shuffled: `toy_tasks.make_example` is already
  an i.i.d. draw per index, and reading index 0, 1, 2, ... reproduces
  `toy_tasks.train_stream` exactly, so every committed result stays reproducible.
- Sharding is strided over the global stream: with K processes, process p reads global
  positions p, p+K, p+2K, ...; shards are disjoint and together they are exactly the
  unsharded stream's prefix (also across epochs, since the slice comes after repeat).
"""

from __future__ import annotations

import numbers
import zlib
from typing import Any, Mapping

import grain
import numpy as np

from copd_jax.data import examples as examples_lib, reward_fns, toy_tasks
from copd_jax.data.examples import _check_int

TRAIN_SOURCE_LENGTH = 2**31 - 1  # "endless": far more indices than any run reads
_MIX_BLOCK = 256  # toy_tasks.mixed_train_stream draws capability choices 256 at a time
_MIX_SEED_TAG = 7  # ... from default_rng([seed, 7]); kept identical here


# Synchronous reads by default: examples are generated on the host in numpy (GIL-bound),
# and the trainer asks for a few per step. Pass grain.ReadOptions(num_threads=N,
# prefetch_buffer_size=M) to overlap generation or file reads with device work.
SYNCHRONOUS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class TaskSource:
  """Random-access source over `toy_tasks.make_example` for one capability and split.

  source[i] == toy_tasks.make_example(capability, i, seed=seed, difficulty=difficulty,
  image_size=..., num_frames=..., split=split). len: TRAIN_SOURCE_LENGTH for train,
  `num_examples` for eval (the held-out `toy_tasks.eval_set` when read in order).
  """

  def __init__(self, capability: str, *, seed: int, difficulty: int, image_size: int = 32,
               num_frames: int = 4, split: str = "train", num_examples: int | None = None,
               conflict: float = 0.0):
    if split not in toy_tasks.SPLITS:
      raise ValueError(f"TaskSource split must be one of {toy_tasks.SPLITS}, got {split!r}")
    # Fail now, on the config, rather than at the first read inside a training step.
    toy_tasks.make_example(capability, 0, seed=seed, difficulty=difficulty,
                       image_size=image_size, num_frames=num_frames, split=split,
                       conflict=conflict)
    if split == "eval":
      if num_examples is None:
        raise ValueError("TaskSource(split='eval') needs num_examples (the eval set size)")
      length = _check_int("num_examples", num_examples, 1)
    else:
      length = TRAIN_SOURCE_LENGTH if num_examples is None else _check_int(
          "num_examples", num_examples, 1)
    self.capability, self.split, self._length = capability, split, length
    self._kwargs = dict(seed=seed, difficulty=difficulty, image_size=image_size,
                        num_frames=num_frames, split=split, conflict=conflict)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> examples_lib.Example:
    if not 0 <= index < self._length:
      raise IndexError(f"TaskSource({self.capability}, {self.split}) index {index} out of "
                       f"range [0, {self._length})")
    return toy_tasks.make_example(self.capability, int(index), **self._kwargs)

  def __repr__(self) -> str:
    return f"TaskSource({self.capability!r}, len={self._length}, {self._kwargs})"


# The task suite's integer check (errors name the field), shared by the data layer.


def _check_shard(shard_index: int, shard_count: int) -> None:
  _check_int("shard_count", shard_count, 1)
  _check_int("shard_index", shard_index, 0, shard_count - 1)


def process_shard() -> tuple[int, int]:
  """(shard_index, shard_count) = (jax.process_index(), jax.process_count()).

  Each process of a multi-controller run reads its own disjoint slice of every stream.
  """
  import jax  # only here: the pipelines themselves never need jax
  return jax.process_index(), jax.process_count()


def _pipeline_seed(*parts: int) -> int:
  """A grain seed in [0, 2**32) derived from several non-negative ints."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def sharded_dataset(dataset: grain.MapDataset, *, seed: int, shuffle: bool,
                    shard_index: int = 0, shard_count: int = 1,
                    num_epochs: int | None = None) -> grain.MapDataset:
  """seed -> [shuffle] -> repeat(num_epochs) -> this process's strided slice.

  Shuffling reshuffles each epoch (grain reseeds per epoch). num_epochs=None: endless.
  """
  _check_shard(shard_index, shard_count)
  _check_int("seed", seed, 0, 2**32 - 1)
  if num_epochs is not None:
    _check_int("num_epochs", num_epochs, 1)
  if len(dataset) == 0:
    raise ValueError(f"cannot build a pipeline over an empty source ({dataset!r})")
  dataset = dataset.seed(seed)
  if shuffle:
    dataset = dataset.shuffle()
  dataset = dataset.repeat(num_epochs)
  return dataset.slice(slice(shard_index, None, shard_count))


def example_iterator(source, *, seed: int, shuffle: bool, shard_index: int = 0,
                     shard_count: int = 1, num_epochs: int | None = None,
                     read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator over `source` (anything with __len__ and __getitem__).

  Yields source[j] for this shard's positions j = shard_index, shard_index+shard_count, ...
  of the (optionally shuffled, repeated) global order. `it.get_state()` is a JSON-able
  dict; `fresh.set_state(state)` continues exactly where `it` stopped.
  """
  dataset = sharded_dataset(grain.MapDataset.source(source), seed=seed, shuffle=shuffle,
                            shard_index=shard_index, shard_count=shard_count,
                            num_epochs=num_epochs)
  return iter(dataset.to_iter_dataset(read_options or SYNCHRONOUS))


def _train_files(cfg) -> dict[str, list[str]]:
  """cfg.data.train_files as capability -> list of paths (empty: procedural tasks).

  Keys are capabilities of this run (cfg.tasks.capabilities): the built-in ones or record
  domain names such as 'math' (see examples_lib.Example); every one of them needs files.
  """
  files = cfg.data.train_files or {}
  if not isinstance(files, Mapping):
    raise ValueError(f"config.data.train_files must map capability -> path or list of "
                     f"paths, got {files!r}")
  out = {}
  for cap, paths in dict(files).items():
    if cap not in cfg.tasks.capabilities:
      raise ValueError(f"config.data.train_files key {cap!r} is not one of this run's "
                       f"capabilities (config.tasks.capabilities = "
                       f"{list(cfg.tasks.capabilities)})")
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths or not all(isinstance(p, str) and p for p in paths):
      raise ValueError(f"config.data.train_files[{cap!r}] must be a path or a non-empty "
                       f"list of paths, got {files[cap]!r}")
    out[cap] = paths
  return out


def capability_dataset(cfg, capability: str, example_kwargs: Mapping[str, Any],
                       seed: int) -> grain.MapDataset:
  """One capability's endless global training order (unsharded) as a MapDataset.

  Procedural (cfg.data.train_files empty): TaskSource(seed=seed) read in index order,
  i.e. exactly toy_tasks.train_stream. Record files (cfg.data.train_files[capability]):
  datasets.RecordSource shuffled with a seed derived from (cfg.data.shuffle_seed, seed,
  capability) -- so two stages or two run seeds see different orders -- and repeated,
  reshuffled every epoch.
  """
  from copd_jax.data import sources as sources_lib
  if sources_lib.has_sources(cfg.data):
    return sources_dataset(cfg, capability, example_kwargs, seed)
  files = _train_files(cfg)
  if not files:
    if capability not in toy_tasks.FAMILIES:
      raise ValueError(f"capability {capability!r} has no procedural generator (those are "
                       f"{toy_tasks.FAMILY_NAMES}); give its records in config.data.train_files")
    source = TaskSource(capability, seed=seed, difficulty=cfg.tasks.difficulty[capability],
                        **example_kwargs)
    return grain.MapDataset.source(source).repeat()
  if capability not in files:
    raise ValueError(f"config.data.train_files has no entry for capability {capability!r} "
                     f"(it names {sorted(files)}); give files for every capability in "
                     f"config.tasks.capabilities, or none to use the procedural tasks")
  from copd_jax.data import records as datasets
  # The model's frame sizes: image records are decoded at its resolution.
  source = datasets.RecordSource(files[capability], capability=capability,
                                 reader=cfg.data.reader, columns=dict(cfg.data.columns),
                                 reward_config=reward_fns.run_config(cfg.reward),
                                 **example_kwargs)
  shuffle_seed = _check_int("config.data.shuffle_seed", cfg.data.shuffle_seed, 0)
  # crc32: a stable per-name number (record domains are not in toy_tasks.CAPABILITIES).
  grain_seed = _pipeline_seed(shuffle_seed, seed, zlib.crc32(capability.encode("utf-8")))
  return sharded_dataset(grain.MapDataset.source(source), seed=grain_seed, shuffle=True)


def sources_dataset(cfg, capability: str, example_kwargs: Mapping[str, Any],
                    seed: int) -> grain.MapDataset:
  """One capability's endless training order from its config.data.sources: each train
  source read with its own columns, shuffled (seed from (shuffle_seed, seed, capability,
  source name)) and repeated; several sources mixed by their weights (grain
  MapDataset.mix: position i of the mixture is a deterministic function of i, so the
  stream state stays {'next_index': n})."""
  from copd_jax.data import records as datasets, sources as sources_lib
  specs = sources_lib.by_domain(sources_lib.all_sources(cfg.data), "train").get(capability)
  if not specs:
    raise ValueError(f"config.data.sources has no train source for capability {capability!r}")
  shuffle_seed = _check_int("config.data.shuffle_seed", cfg.data.shuffle_seed, 0)
  parts = []
  for spec in specs:
    source = datasets.RecordSource(spec.paths, capability=capability,
                                   reader=cfg.data.reader,
                                   reward_config=reward_fns.run_config(cfg.reward),
                                   columns=spec.columns, **example_kwargs)
    grain_seed = _pipeline_seed(shuffle_seed, seed, zlib.crc32(capability.encode("utf-8")),
                                zlib.crc32(spec.name.encode("utf-8")))
    parts.append(sharded_dataset(grain.MapDataset.source(source), seed=grain_seed,
                                 shuffle=True))
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, [spec.weight for spec in specs])


def _shard_iterator(dataset: grain.MapDataset, shard_index: int, shard_count: int,
                    read_options) -> grain.DatasetIterator:
  _check_shard(shard_index, shard_count)
  dataset = dataset.slice(slice(shard_index, None, shard_count))
  return iter(dataset.to_iter_dataset(read_options or SYNCHRONOUS))


class IndexedStream:
  """An endless stream over a random-access grain MapDataset whose positions can be
  reserved without loading the example and loaded later by index.

  The trainer reserves every prompt of a step's GLOBAL batch (so every process of a
  multi-process run advances the same order) but each process loads only the examples
  of the rows its devices hold. `next(stream)` reserves and loads in one go.
  State: {"next_index": n}, the same dict as grain's DatasetIterator.get_state().
  """

  def __init__(self, dataset: grain.MapDataset, name: str = ""):
    self._dataset = dataset
    self._name = name
    self._next_index = 0

  def reserve(self) -> int:
    index = self._next_index
    self._next_index += 1
    return index

  def load(self, index: int) -> examples_lib.Example:
    return self._dataset[index]

  def __iter__(self) -> "IndexedStream":
    return self

  def __next__(self) -> examples_lib.Example:
    return self.load(self.reserve())

  def get_state(self) -> dict:
    return {"next_index": self._next_index}

  def set_state(self, state: Mapping[str, Any]) -> None:
    index = state.get("next_index") if isinstance(state, Mapping) else None
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
      raise ValueError(f"stream {self._name!r}: state must be {{'next_index': n >= 0}}, "
                       f"got {state!r}")
    self._next_index = int(index)


def make_streams(cfg, example_kwargs: Mapping[str, Any], seed: int, *, shard_index: int = 0,
                 shard_count: int = 1) -> dict[str, IndexedStream]:
  """One endless checkpointable stream of examples_lib.Example per cfg.tasks.capabilities entry.

  cfg.tasks.capabilities (not cfg.rl.capabilities) because cross-capability OPD draws
  teacher-domain prompts too. seed: the task seed (methods.data_context:
  cfg.tasks.seed + 1000 * cfg.seed + offset). With shard_count=1 each stream equals
  toy_tasks.train_stream(cap, seed=seed, ...) exactly. Streams are IndexedStreams, so a
  multi-process run can reserve the global batch and load only its own rows.
  """
  _check_shard(shard_index, shard_count)
  return {cap: IndexedStream(capability_dataset(cfg, cap, example_kwargs, seed).slice(
              slice(shard_index, None, shard_count)), name=cap)
          for cap in cfg.tasks.capabilities}


def streams_state(streams: Mapping[str, Any]) -> dict[str, dict]:
  """capability -> stream state (JSON-serialisable), for a checkpoint."""
  return {cap: it.get_state() for cap, it in streams.items()}


def restore_streams(streams: Mapping[str, Any], state: Mapping[str, Mapping]) -> None:
  """Sets every stream to its saved position; the capabilities must match exactly."""
  if set(streams) != set(state):
    raise ValueError(f"data-iterator state covers capabilities {sorted(state)}, but this "
                     f"run's streams are {sorted(streams)}")
  for cap, it in streams.items():
    it.set_state(dict(state[cap]))














def eval_source(cfg, capability: str, example_kwargs: Mapping[str, Any],
                num_examples: int) -> TaskSource:
  """The held-out set as a random-access source: source[i] == toy_tasks.eval_set(...)[i]."""
  return TaskSource(capability, seed=cfg.tasks.seed,
                    difficulty=cfg.tasks.difficulty[capability], split="eval",
                    num_examples=num_examples, **example_kwargs)
