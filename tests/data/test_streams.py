"""grain pipelines (copd_jax/data/streams.py) and the TFDS array_record builder (tfds_tasks.py):
exact equality with the task streams, checkpointable iterator state, per-process
sharding, the record-file branch, and a tiny static split written and read back."""
import json
import sys
import types

import grain
import numpy as np
import pytest

from copd_jax.config_lib import spec_of
from copd_jax import default_config
from copd_jax.data import examples, streams as data, toy_tasks as tasks

KW = dict(image_size=32, num_frames=4)


def same(a: examples.Example, b: examples.Example) -> bool:
  fields = (a.capability, a.question, a.answer, a.solution) == (
      b.capability, b.question, b.answer, b.solution)
  if a.frames is None or b.frames is None:
    return fields and a.frames is None and b.frames is None
  return fields and np.array_equal(a.frames, b.frames)


def all_same(xs, ys) -> bool:
  return len(xs) == len(ys) and all(same(x, y) for x, y in zip(xs, ys))


def take(it, n):
  return [next(it) for _ in range(n)]


@pytest.fixture
def cfg():
  return default_config.get("copd", "micro")


def only_capabilities(cfg, caps):
  """A run on `caps` alone: the base's tasks, the RL branches and their number agree (the
  RunSpec checks that they do)."""
  cfg.tasks.capabilities = cfg.rl.capabilities = caps
  cfg.num_experts = len(caps)


# ------------------------------------------------------------- procedural task streams

def test_make_streams_equal_train_stream(cfg):
  streams = data.make_streams(spec_of(cfg), KW, seed=11)
  assert set(streams) == set(cfg.tasks.capabilities)
  for cap, it in streams.items():
    ref = tasks.train_stream(cap, seed=11, difficulty=cfg.tasks.difficulty[cap], **KW)
    assert all_same(take(it, 12), take(ref, 12)), cap


def test_task_source_is_make_example_and_eval_set(cfg):
  source = data.TaskSource("video", seed=3, difficulty=2, **KW)
  assert len(source) == data.TRAIN_SOURCE_LENGTH
  assert same(source[10**6], tasks.make_example("video", 10**6, seed=3, difficulty=2, **KW))
  ev = data.eval_source(spec_of(cfg), "image", KW, num_examples=5)
  assert len(ev) == 5
  ref = tasks.eval_set("image", 5, seed=cfg.tasks.seed, difficulty=cfg.tasks.difficulty["image"],
                       **KW)
  assert all_same([ev[i] for i in range(5)], ref)
  with pytest.raises(IndexError):
    ev[5]


def test_stream_state_round_trips_through_json(cfg):
  streams = data.make_streams(spec_of(cfg), KW, seed=2)
  for it in streams.values():
    take(it, 5)
  saved = json.loads(json.dumps(data.streams_state(streams)))
  expected = {cap: take(it, 4) for cap, it in streams.items()}
  fresh = data.make_streams(spec_of(cfg), KW, seed=2)
  data.restore_streams(fresh, saved)
  for cap, it in fresh.items():
    assert all_same(take(it, 4), expected[cap]), cap
  with pytest.raises(ValueError, match="capabilities"):
    data.restore_streams(fresh, {"text": saved["text"]})


def test_two_shards_are_disjoint_and_cover_the_stream():
  source = data.TaskSource("text", seed=0, difficulty=3)
  whole = take(data.example_iterator(source, seed=0, shuffle=False), 12)
  shards = [take(data.example_iterator(source, seed=0, shuffle=False, shard_index=p,
                                       shard_count=2), 6) for p in (0, 1)]
  assert all_same(shards[0], whole[0::2]) and all_same(shards[1], whole[1::2])
  # text at difficulty 3 never repeats in 12 draws, so disjoint contents is meaningful
  keys = [{ex.key() for ex in shard} for shard in shards]
  assert not keys[0] & keys[1]


def test_shuffled_epochs_shard_and_reshuffle():
  source = list(range(10))  # any random-access sequence works as a source
  whole = take(data.example_iterator(source, seed=4, shuffle=True), 20)
  assert sorted(whole[:10]) == sorted(whole[10:]) == source  # each epoch a permutation
  assert whole[:10] != whole[10:] and whole[:10] != source  # reshuffled per epoch
  shards = [take(data.example_iterator(source, seed=4, shuffle=True, shard_index=p,
                                       shard_count=2), 10) for p in (0, 1)]
  assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
  finite = data.example_iterator(source, seed=4, shuffle=True, num_epochs=1)
  assert list(finite) == whole[:10]


def test_bad_pipeline_arguments_are_named():
  with pytest.raises(ValueError, match="shard_index"):
    data.example_iterator([1, 2], seed=0, shuffle=False, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="num_epochs"):
    data.example_iterator([1, 2], seed=0, shuffle=False, num_epochs=0)
  with pytest.raises(ValueError, match="difficulty"):
    data.TaskSource("text", seed=0, difficulty=9)
  with pytest.raises(ValueError, match="num_examples"):
    data.TaskSource("text", seed=0, difficulty=1, split="eval")
  assert data.process_shard() == (0, 1)


def test_prefetching_threads_keep_order_and_state():
  source = data.TaskSource("text", seed=0, difficulty=1)
  threaded = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
  it = data.example_iterator(source, seed=3, shuffle=True, read_options=threaded)
  got = take(it, 10)
  assert it.get_state() == {"next_index": 10}  # consumed, not prefetched, elements
  assert all_same(got, take(data.example_iterator(source, seed=3, shuffle=True), 10))


# ---------------------------------------------------------------- record-file branch
# helper F's copd_jax/data/records.py may not exist yet: a stand-in with the agreed API
# (RecordSource(paths, capability=cap), random access -> examples.Example) is installed.

class FakeRecordSource:
  """Stands in for datasets.RecordSource (same constructor) with made-up records."""

  def __init__(self, paths, *, capability, image_size=None, num_frames=None, reader="builtin",
               columns=None, reward_config=None):
    self.paths, self.capability = list(paths), capability
    self.image_size, self.num_frames = image_size, num_frames
    if capability in tasks.CAPABILITIES:
      extra = dict(frames=None if capability == "text" else np.zeros((1, 8, 8, 3)))
    else:  # a record domain such as 'math': text input
      extra = dict(modality="text")
    self._examples = [examples.Example(capability, f"{p}#{i}", str(i), f"{i}#{i}", **extra)
                      for p in self.paths for i in range(3)]

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, index):
    return self._examples[index]


@pytest.fixture
def fake_datasets(monkeypatch):
  module = types.ModuleType("copd_jax.data.records")
  module.RecordSource = FakeRecordSource
  monkeypatch.setitem(sys.modules, "copd_jax.data.records", module)
  monkeypatch.setattr(sys.modules["copd_jax.data"], "records", module, raising=False)
  return module


def test_record_files_are_shuffled_repeated_and_resumable(cfg, fake_datasets):
  only_capabilities(cfg, ("text", "image"))
  cfg.data.train_files = {"text": "a.jsonl", "image": ["b.parquet", "c.parquet"]}
  streams = data.make_streams(spec_of(cfg), KW, seed=5)
  text = [ex.question for ex in take(streams["text"], 6)]
  assert sorted(text[:3]) == sorted(text[3:]) == ["a.jsonl#0", "a.jsonl#1", "a.jsonl#2"]
  image = [ex.question for ex in take(streams["image"], 6)]
  assert sorted(image) == sorted(f"{p}#{i}" for p in ("b.parquet", "c.parquet") for i in range(3))
  assert image != sorted(image) or text[:3] != sorted(text[:3])  # some shuffling happened
  state = json.loads(json.dumps(data.streams_state(streams)))
  expected = {cap: [ex.question for ex in take(it, 5)] for cap, it in streams.items()}
  fresh = data.make_streams(spec_of(cfg), KW, seed=5)
  data.restore_streams(fresh, state)
  assert {cap: [ex.question for ex in take(it, 5)] for cap, it in fresh.items()} == expected
  other_seed = data.make_streams(spec_of(cfg), KW, seed=6)["image"]
  assert [ex.question for ex in take(other_seed, 6)] != image


def test_record_files_must_cover_every_capability(cfg, fake_datasets):
  cfg.data.train_files = {"text": "a.jsonl"}
  with pytest.raises(ValueError, match="no entry for capability 'image'"):
    data.make_streams(spec_of(cfg), KW, seed=0)
  cfg.data.train_files = {"audio": "a.jsonl"}
  with pytest.raises(ValueError, match="'audio'"):
    data.make_streams(spec_of(cfg), KW, seed=0)
  cfg.data.train_files = {"text": []}
  with pytest.raises(ValueError, match=r"train_files\['text'\]"):
    data.make_streams(spec_of(cfg), KW, seed=0)


def test_record_domains_stream(cfg, fake_datasets):
  only_capabilities(cfg, ("text", "math"))
  cfg.warm_start.mix = dict(text=1.0, image=1.0, math=3.0)  # image: not in this run
  with pytest.raises(ValueError, match="no procedural generator"):
    data.make_streams(spec_of(cfg), KW, seed=0)
  cfg.data.train_files = {"text": "t.jsonl", "math": "m.jsonl"}
  streams = data.make_streams(spec_of(cfg), KW, seed=0)
  assert {ex.question.split("#")[0] for ex in take(streams["math"], 3)} == {"m.jsonl"}


# ------------------------------------------------------------------------ TFDS builder

@pytest.mark.parametrize("cap", tasks.CAPABILITIES)
def test_tfds_static_split_round_trip(tmp_path, cap):
  tfds_tasks = pytest.importorskip("copd_jax.data.tfds_tasks")
  name = tfds_tasks.write_static_split(tmp_path, cap, difficulty=1, seed=5, num_train=8,
                                       num_eval=4)
  assert name == f"{cap}_d1_seed5_img32_f4_train8_eval4"
  for split, n in (("train", 8), ("eval", 4)):
    source = tfds_tasks.load_static_split(tmp_path, cap, split)
    assert len(source) == n
    ref = [tasks.make_example(cap, i, seed=5, difficulty=1, split=split, **KW)
           for i in range(n)]
    assert all_same([source[i] for i in range(n)], ref), split
    if cap != "text":
      assert source[0].frames.dtype == np.float32
  # The static split plugs into the grain pipeline like any other source.
  it = data.example_iterator(source, seed=1, shuffle=True)
  assert sorted(ex.key() for ex in take(it, 4)) == sorted(ex.key() for ex in ref)


def test_tfds_reader_errors_name_what_is_missing(tmp_path):
  tfds_tasks = pytest.importorskip("copd_jax.data.tfds_tasks")
  with pytest.raises(ValueError, match="no text datasets"):
    tfds_tasks.load_static_split(tmp_path, "text", "train")
  with pytest.raises(FileNotFoundError, match="text_d0"):
    tfds_tasks.load_static_split(tmp_path, "text", "eval", config="text_d0")
  with pytest.raises(ValueError, match="split"):
    tfds_tasks.load_static_split(tmp_path, "text", "validation")
  with pytest.raises(ValueError, match="num_train"):
    tfds_tasks.write_static_split(tmp_path, "text", difficulty=0, num_train=0)
  assert tfds_tasks.config_name("image", difficulty=2) == "image_d2"


def test_tfds_predefined_config_reads_through_tfds_data_source(tmp_path):
  tfds_tasks = pytest.importorskip("copd_jax.data.tfds_tasks")
  import tensorflow_datasets as tfds
  name = tfds_tasks.write_static_split(tmp_path, "text", difficulty=0)  # 4096 + 128, ~2 s
  assert name == "text_d0"
  raw = tfds.data_source(f"copd_tasks/{name}", split="eval", data_dir=tmp_path, download=False)
  assert len(raw) == tfds_tasks.DEFAULTS["num_eval"]
  ref = tasks.eval_set("text", 3, seed=tfds_tasks.DEFAULTS["seed"], difficulty=0)
  source = tfds_tasks.load_static_split(tmp_path, "text", "eval")
  assert all_same([source[i] for i in range(3)], ref)
  assert raw[2]["question"].decode() == ref[2].question


def test_static_split_source_rejects_bad_records():
  tfds_tasks = pytest.importorskip("copd_jax.data.tfds_tasks")
  good = dict(index=0, capability=b"text", question=b"1+1=?", answer=b"2", solution=b"1+1=2#2")
  source = tfds_tasks.StaticSplitSource(
      [good, {**good, "capability": b"image"}, {**good, "index": 7}, {"index": 3}],
      capability="text", where="/data/copd_tasks/text_d0 [train]")
  assert source[0].answer == "2"
  for index, why in ((1, "capability 'image'"), (2, "holds example 7"), (3, "missing field 'capability'")):
    with pytest.raises(ValueError, match=rf"text_d0 \[train\]: bad record {index}: .*{why}"):
      source[index]
