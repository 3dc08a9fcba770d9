"""Training checkpoints: checksums on restore, and one short message when a restore fails
(issue 13.9).

Each case reproduces a failure found by trying the project with bad input and injected faults,
and checks the behaviour that replaced it. Expected values are written out by hand."""
import os

import numpy as np
import pytest

import micro_runs


@pytest.fixture(scope="module")
def micro_base():
  return micro_runs.micro_base()


# ----------------------------------------------- 13.9 checkpoint checksums on restore

def _stage_state():
  import jax
  import jax.numpy as jnp
  import optax
  # Random values do not compress, so their bytes lie verbatim in orbax's data file.
  bits = np.random.default_rng(0).integers(0, 2**32, size=(2, 64, 64), dtype=np.uint32)
  kernel = (bits & np.uint32(0xBFFFFFFF)).view(np.float32)  # exponent < 128: finite
  p = {"dense": {"kernel": jnp.asarray(kernel)},
       "norm": {"scale": jnp.full((2, 4), 0.5)}}
  opt = optax.adam(1e-2)
  return {"params": p, "opt_state": jax.vmap(opt.init)(p)}


def _stage_ckpt(root, fallback=False):
  from copd_jax.run_spec import CheckpointSpec

  from copd_jax import train_checkpoint as tc
  opts = CheckpointSpec(**dict(every_steps=1, max_to_keep=3, async_save=False, resume=True,
                         save_on_sigterm=True, fallback_on_corrupt=fallback))
  run = tc.RunCheckpoints(str(root), opts, method="copd", num_experts=2, seed=0,
                          config_json={})
  return run.for_stage("copd", ["text", "image"])


def _host(step):
  from copd_jax import train_checkpoint as tc
  return tc.HostState(stage_step=step, global_step=step, finished=False, numpy_rng={},
                      schedule={}, last_overlap=None, streams={})


def _flip_bytes_of_array(step_dir, value: np.ndarray, count=1):
  """Flips `count` bytes inside the stored bytes of the array whose raw contents are
  `value` (found by searching the checkpoint's data files for its bytes)."""
  needle = value.tobytes()[4096:4160]  # 64 bytes from the middle of the array
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(dirpath, name)
      data = bytearray(open(path, "rb").read())
      at = data.find(needle)
      if at >= 0:
        for j in range(count):
          data[at + 8 * j] ^= 0x10
        open(path, "wb").write(bytes(data))
        return path
  raise AssertionError("array bytes not found uncompressed in the checkpoint")


@pytest.mark.parametrize("count", [1, 8])
def test_flipped_byte_in_a_checkpoint_names_the_array(tmp_path, count):
  import jax
  from orbax.checkpoint import utils as ocp_utils

  from copd_jax import train_checkpoint as tc
  state = _stage_state()
  ck = _stage_ckpt(tmp_path)
  ck.save(state, _host(1), ["text", "image"])
  ck.close()
  _flip_bytes_of_array(os.path.join(ck.directory, "1"), np.asarray(state["params"]["dense"]["kernel"]),
                       count)
  abstract = jax.tree.map(ocp_utils.to_shape_dtype_struct, state)
  with pytest.raises(tc.CheckpointCorruptError,
                     match=r"1/?.* is corrupt.*\['params'\]\['dense'\]\['kernel'\]"):
    _stage_ckpt(tmp_path).restore_latest(abstract)


def test_corrupt_newest_checkpoint_falls_back_only_when_asked(tmp_path):
  import jax
  from orbax.checkpoint import utils as ocp_utils

  from copd_jax import train_checkpoint as tc
  state = _stage_state()
  newer = jax.tree.map(lambda x: -x, state)  # as incompressible as `state`
  ck = _stage_ckpt(tmp_path)
  ck.save(state, _host(1), ["text", "image"])
  ck.save(newer, _host(2), ["text", "image"])
  ck.close()
  _flip_bytes_of_array(os.path.join(ck.directory, "2"), np.asarray(newer["params"]["dense"]["kernel"]))
  abstract = jax.tree.map(ocp_utils.to_shape_dtype_struct, state)
  with pytest.raises(tc.CheckpointCorruptError):
    _stage_ckpt(tmp_path).restore_latest(abstract)
  restored, host = _stage_ckpt(tmp_path, fallback=True).restore_latest(abstract, True)
  assert host.stage_step == 1
  np.testing.assert_array_equal(np.asarray(restored["params"]["dense"]["kernel"]),
                                np.asarray(state["params"]["dense"]["kernel"]))


def test_checksums_ignore_sharding():
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from copd_jax import train_checkpoint as tc
  state = _stage_state()
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
  sharded = jax.tree.map(lambda x: jax.device_put(
      x, NamedSharding(mesh, P("a", "b") if x.ndim == 3 else P("a"))), state["params"])
  assert tc.array_checksums(sharded) == tc.array_checksums(state["params"])
  changed = dict(state["params"], norm={"scale": state["params"]["norm"]["scale"].at[1, 3].set(0.25)})
  assert tc.checksum_mismatches(tc.array_checksums(state["params"]), changed) == \
      ["['norm']['scale']"]


def _truncate_state_files(step_dir):
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(dirpath, name)
      if os.path.getsize(path) > 1000:
        with open(path, "r+b") as f:
          f.truncate(500)


def test_failed_restore_is_one_short_message_and_closes_the_manager(tmp_path, micro_base,
                                                                    monkeypatch):
  """A failed restore printed ~100 tracebacks (tensorstore's spec dump, then orbax threads
  left running at exit) that buried the real message."""
  from copd_jax import checkpoint, train_checkpoint
  cfg = micro_runs.experts_config(tmp_path, steps=1)
  micro_runs.run_method(cfg, micro_base)
  _truncate_state_files(os.path.join(cfg.workdir, "checkpoints", "experts", "1"))
  closed = []
  real_close = train_checkpoint.StageCheckpointer.close
  monkeypatch.setattr(train_checkpoint.StageCheckpointer, "close",
                      lambda self: (closed.append(self.directory), real_close(self)))
  with pytest.raises(checkpoint.CheckpointMismatchError) as caught:
    micro_runs.run_method(cfg, micro_base)
  message = str(caught.value)
  assert "cannot restore training state" in message and "experts/1" in message
  assert len(message.splitlines()) == 1 and "TensorStore({" not in message
  assert closed == [os.path.join(os.path.abspath(cfg.workdir), "checkpoints", "experts")]
