"""Policy checkpoints: round trip, and mismatches named rather than re-initialised."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from copd_jax.config_lib import spec_of
from copd_jax import checkpoint


def params(width=3):
  return {"layers_0": {"kernel": jnp.arange(2 * width, dtype=jnp.float32).reshape(2, width)},
          "norm": {"scale": jnp.ones(4)}}


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_round_trip(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(), {"model": {"d": 3}})
  assert checkpoint.has_policy(str(tmp_path))
  restored = checkpoint.load_policy(str(tmp_path), abstract(params()), {"model": {"d": 3}})
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params())):
    np.testing.assert_array_equal(a, b)


def test_metadata_mismatch_names_field(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(), {"model": {"d": 3}, "seed": 0})
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model\.d: checkpoint has 3, run expects 4"):
    checkpoint.load_policy(str(tmp_path), abstract(params()), {"model": {"d": 4}, "seed": 0})


def test_shape_mismatch_names_parameter(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(width=3), {})
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"layers_0.*kernel.*\(2, 3\).*\(2, 5\)"):
    checkpoint.load_policy(str(tmp_path), abstract(params(width=5)), {})


def test_missing_parameter_named(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(), {})
  wanted = dict(abstract(params()), extra={"bias": jax.ShapeDtypeStruct((2,), jnp.float32)})
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"extra.*bias.*missing in checkpoint"):
    checkpoint.load_policy(str(tmp_path), wanted, {})


def test_unfinished_checkpoint_is_not_a_policy(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(), {})
  os.remove(os.path.join(tmp_path, checkpoint.METADATA_FILE))  # as if killed before the end
  assert not checkpoint.has_policy(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="metadata.json missing"):
    checkpoint.load_policy(str(tmp_path), abstract(params()), {})


def test_truncated_params_fail_clearly(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(), {})
  params_dir = os.path.join(tmp_path, checkpoint.PARAMS_SUBDIR)
  for name in os.listdir(params_dir):
    path = os.path.join(params_dir, name)
    if os.path.isfile(path):
      os.remove(path)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="cannot read parameter metadata"):
    checkpoint.load_policy(str(tmp_path), abstract(params()), {})


# ------------------------------------------------- training-state checkpoints (stages)

import json
import signal

import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from copd_jax.run_spec import CheckpointSpec
from orbax.checkpoint import utils as ocp_utils

from copd_jax import train_checkpoint as tc


def stacked_state(experts=2, width=3):
  """A stacked [E] params pytree with its adam state."""
  p = {"dense": {"kernel": jnp.arange(experts * 2 * width, dtype=jnp.float32).reshape(
      experts, 2, width) / 7.0}, "norm": {"scale": jnp.ones((experts, 4))}}
  opt = optax.adam(1e-2)
  opt_state = jax.vmap(opt.init)(p)
  # One real update, so mu / nu / count are not just their initial values.
  grads = jax.tree.map(lambda x: x * 0.5 + 1.0, p)
  updates, opt_state = jax.vmap(opt.update)(grads, opt_state, p)
  return {"params": optax.apply_updates(p, updates), "opt_state": opt_state}


def host_state(step, **kw):
  rng = np.random.default_rng(5)
  rng.random(3)
  fields = dict(stage_step=step, global_step=10 + step, finished=False,
                numpy_rng=rng.bit_generator.state, schedule={"opd_steps_left": 1},
                last_overlap=0.125, streams={"text": {"kind": "json", "value": {"i": 3}}},
                nonfinite_total=1, nonfinite_in_row=0, metrics_offset=42)
  fields.update(kw)
  return tc.HostState(**fields)


def stage_ckpt(root, method="copd", stage="copd", experts=2, branches=("text", "image"),
               max_to_keep=2):
  opts = CheckpointSpec(**dict(every_steps=1, max_to_keep=max_to_keep, async_save=True, resume=True,
                         save_on_sigterm=True))
  run = tc.RunCheckpoints(str(root), opts, method=method, num_experts=experts, seed=0,
                          config_json={"method": method})
  return run.for_stage(stage, branches)


def abstract_of(state):
  return jax.tree.map(ocp_utils.to_shape_dtype_struct, state)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stage_checkpoint_round_trip_keeps_optax_types_and_host_state(tmp_path):
  state = stacked_state()
  ck = stage_ckpt(tmp_path)
  for step in (1, 2, 3):
    ck.save(state, host_state(step), ["text", "image"])
  ck.close()
  ck = stage_ckpt(tmp_path)
  assert sorted(int(d) for d in os.listdir(ck.directory) if d.isdigit()) == [2, 3]  # keep 2
  restored, host = ck.restore_latest(abstract_of(state))
  assert host == host_state(3)
  rng = np.random.default_rng()
  rng.bit_generator.state = host.numpy_rng
  reference = np.random.default_rng(5)
  reference.random(3)
  assert rng.random() == reference.random()  # the picker continues where it stopped
  assert type(restored["opt_state"][0]).__name__ == "ScaleByAdamState"
  assert_trees_equal(restored, state)


def test_restore_onto_a_smaller_mesh(tmp_path):
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py sets 8 host devices"
  state = stacked_state(experts=8)
  big = NamedSharding(Mesh(np.array(devices), ("expert",)), P("expert"))
  state8 = jax.tree.map(lambda x: jax.device_put(x, big) if x.ndim else x, state)
  ck = stage_ckpt(tmp_path, experts=8, branches=[str(i) for i in range(8)])
  ck.save(state8, host_state(1), [str(i) for i in range(8)])
  ck.close()
  small = NamedSharding(Mesh(np.array(devices[:4]), ("expert",)), P("expert"))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=small if x.ndim else None),
      state)
  restored, _ = stage_ckpt(tmp_path, experts=8, branches=[str(i) for i in range(8)]
                           ).restore_latest(abstract)
  kernel = restored["params"]["dense"]["kernel"]
  assert kernel.sharding == small and len(kernel.sharding.device_set) == 4
  assert {s.data.shape for s in kernel.addressable_shards} == {(2, 2, 3)}
  assert_trees_equal(restored, state)


@pytest.mark.parametrize("change, message", [
    (dict(experts=3), r"num_experts: checkpoint has 2, run has 3"),
    (dict(method="experts"), r"method: checkpoint has 'copd', run has 'experts'"),
    (dict(branches=("text", "video")), r"branches: checkpoint has \['text', 'image'\]"),
])
def test_mismatched_run_is_named(tmp_path, change, message):
  state = stacked_state()
  ck = stage_ckpt(tmp_path)
  ck.save(state, host_state(1), ["text", "image"])
  ck.close()
  with pytest.raises(checkpoint.CheckpointMismatchError, match=message):
    stage_ckpt(tmp_path, **change).restore_latest(abstract_of(state))


def test_mismatched_shapes_are_named(tmp_path):
  ck = stage_ckpt(tmp_path)
  ck.save(stacked_state(width=3), host_state(1), ["text", "image"])
  ck.close()
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"parameter \['dense'\]\['kernel'\]: checkpoint shape \(2, 2, 3\), run has \(2, 2, 5\)"):
    stage_ckpt(tmp_path).restore_latest(abstract_of(stacked_state(width=5)))


def test_truncated_files_fail_clearly(tmp_path):
  state = stacked_state()
  ck = stage_ckpt(tmp_path)
  ck.save(state, host_state(1), ["text", "image"])
  ck.close()
  for dirpath, _, files in os.walk(os.path.join(ck.directory, "1", "state")):
    for name in files:
      path = os.path.join(dirpath, name)
      size = os.path.getsize(path)
      with open(path, "r+b") as f:
        f.truncate(size // 2)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"cannot restore training state"):
    stage_ckpt(tmp_path).restore_latest(abstract_of(state))


def test_interrupted_save_leaves_the_last_good_step(tmp_path):
  state = stacked_state()
  ck = stage_ckpt(tmp_path)
  ck.save(state, host_state(1), ["text", "image"])
  ck.close()
  # What a save killed mid-write leaves behind: a tmp directory with partial files.
  partial = os.path.join(ck.directory, "2.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "manifest.ocdbt"), "wb") as f:
    f.write(b"\0" * 10)
  ck = stage_ckpt(tmp_path)
  assert ck.latest_step() == 1
  restored, host = ck.restore_latest(abstract_of(state))
  assert host.stage_step == 1
  assert_trees_equal(restored, state)


def test_no_checkpoint_from_nonfinite_params(tmp_path):
  state = stacked_state()
  state["params"]["norm"]["scale"] = state["params"]["norm"]["scale"].at[1, 2].set(jnp.nan)
  ck = stage_ckpt(tmp_path)
  with pytest.raises(tc.NonFiniteTrainingError, match=r"branch\(es\) \['image'\] are not finite"):
    ck.save(state, host_state(1), ["text", "image"])
  ck.close()
  assert ck.latest_step() is None


def test_resume_off_refuses_existing_checkpoints(tmp_path):
  ck = stage_ckpt(tmp_path)
  ck.save(stacked_state(), host_state(1), ["text", "image"])
  ck.close()
  opts = CheckpointSpec(**dict(every_steps=0, max_to_keep=2, async_save=True, resume=False,
                         save_on_sigterm=True))
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"holds training checkpoints for \['copd'\]"):
    tc.RunCheckpoints(str(tmp_path), opts, method="copd", num_experts=2, seed=0, config_json={})


def test_stream_positions_round_trip_through_a_checkpoint():
  # The run's streams are grain iterators (copd_jax.data.streams); their positions are JSON.
  from copd_jax.data import streams as data
  source = data.TaskSource("text", seed=3, difficulty=1)
  make = lambda: data.example_iterator(source, seed=0, shuffle=False)
  a = make()
  first = [next(a).question for _ in range(3)]
  state = json.loads(json.dumps(tc.streams_state({"text": a})))
  rest = [next(a).question for _ in range(2)]
  b = {"text": make()}
  tc.restore_streams(b, state)
  assert [next(b["text"]).question for _ in range(2)] == rest
  assert first != rest
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"data streams \['text'\]"):
    tc.restore_streams({"image": make()}, state)


def test_sigterm_only_sets_the_stop_flag():
  with tc.stop_on_signals(True) as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is not None


def test_metrics_log_rewinds_to_a_checkpoint_and_never_pads(tmp_path):
  from copd_jax.run_log import MetricsWriter
  writer = MetricsWriter(str(tmp_path))
  writer.write(1, {"a": 1.0})
  opts = CheckpointSpec(**dict(every_steps=0, max_to_keep=2, async_save=True, resume=True,
                         save_on_sigterm=True))
  run = tc.RunCheckpoints(str(tmp_path), opts, method="copd", num_experts=2, seed=0,
                          config_json={})
  start = run.log_start_offset(writer.jsonl_size())
  writer.write(2, {"a": 2.0})
  saved = writer.jsonl_size()
  writer.write(3, {"a": 3.0})  # written by the run that is then killed
  assert writer.rewind_jsonl(saved)
  writer.write(3, {"a": 4.0})
  writer.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}, {"step": 3, "a": 4.0}]
  # A restart without any checkpoint rewinds to where RL training first began.
  assert run.log_start_offset(10_000) == start == len(json.dumps({"step": 1, "a": 1.0})) + 1
  writer = MetricsWriter(str(tmp_path))
  assert not writer.rewind_jsonl(10_000)  # shorter than asked: left alone, not padded
  assert writer.jsonl_size() == os.path.getsize(tmp_path / "metrics.jsonl")
  writer.close()


def test_base_metadata_ignores_execution_only_model_fields():
  """remat and attention_block change how the model is computed, not its weights: a base
  saved with (or before) any value of them is reused by a run with another value."""
  from copd_jax import default_config, warm_start
  from copd_jax.models import model_config as model
  cfg = default_config.get("base", "micro")
  want = warm_start.base_policy_metadata(spec_of(cfg))
  for field, value in (("remat", True), ("attention_block", 16)):
    assert field in model.EXECUTION_FIELDS
    changed = default_config.get("base", "micro")
    changed.model[field] = value
    assert warm_start.base_policy_metadata(spec_of(changed)) == want, field
  changed = default_config.get("base", "micro")
  changed.model.d_model = 48  # a weight-shaping field still counts
  assert warm_start.base_policy_metadata(spec_of(changed)) != want
