"""Everything a resume reads is verified (issue 30, item 4).

Found on main: the host and metadata JSON of a training checkpoint (data-stream position,
RNG state, config) were outside the checksums, so a one-bit flip in a stream-position
digit restored silently and the resumed run trained on other data; deleting `checksums`
from the metadata silently turned verification off. Now the host state, the config and
the metadata itself carry SHA-256 digests, and a checkpoint without them is an error
unless config.checkpoint.allow_unverified."""
import json
import os

import jax
import jax.numpy as jnp
import pytest
from copd_jax.run_spec import CheckpointSpec
from orbax.checkpoint import utils as ocp_utils

from copd_jax import config_lib, default_config
from copd_jax import train_checkpoint as tc

BRANCHES = ["text", "image"]
POSITION = 12345  # the text stream's next record


def checkpoints(root, allow_unverified=False):
  opts = CheckpointSpec(**dict(every_steps=1, max_to_keep=3, async_save=False, resume=True,
                         save_on_sigterm=True, allow_unverified=allow_unverified))
  run = tc.RunCheckpoints(str(root), opts, method="copd", num_experts=2, seed=0,
                          config_json={"rl": {"learning_rate": 0.0003}})
  return run.for_stage("copd", BRANCHES)


def state():
  return {"params": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)},
          "opt_state": {"m": jnp.ones((2, 3))}}


def saved(root) -> str:
  """Saves step 1 (stream position POSITION) and returns the step directory."""
  ck = checkpoints(root)
  host = tc.HostState(stage_step=1, global_step=1, finished=False,
                      numpy_rng={"bit_generator": "PCG64", "state": {"state": 987654321}},
                      schedule={}, last_overlap=None,
                      streams={"text": {"next_index": POSITION}})
  ck.save(state(), host, BRANCHES)
  ck.close()
  return os.path.join(ck.directory, "1")


def restore(root, allow_unverified=False):
  abstract = jax.tree.map(ocp_utils.to_shape_dtype_struct, state())
  return checkpoints(root, allow_unverified).restore_latest(abstract)


def flip_bit(path: str, text: str, bit: int = 0x01) -> None:
  """Flips one bit of the first character of `text` in the file at `path`."""
  data = bytearray(open(path, "rb").read())
  at = data.find(text.encode())
  assert at >= 0, f"{text!r} not in {path}"
  data[at] ^= bit
  open(path, "wb").write(bytes(data))


def test_an_intact_checkpoint_restores_its_stream_position(tmp_path):
  saved(tmp_path)
  _, host = restore(tmp_path)
  assert host.streams == {"text": {"next_index": POSITION}}


def test_a_one_bit_flip_in_a_stream_position_digit_is_detected(tmp_path):
  step = saved(tmp_path)
  flip_bit(os.path.join(step, "host", "metadata"), str(POSITION), 0x02)  # '1' -> '3'
  assert '"next_index": 32345' in open(os.path.join(step, "host", "metadata")).read()
  with pytest.raises(tc.CheckpointCorruptError, match=r"is corrupt: its host state"):
    restore(tmp_path)


def test_a_flipped_rng_digit_is_detected(tmp_path):
  step = saved(tmp_path)
  flip_bit(os.path.join(step, "host", "metadata"), "87654321", 0x01)  # '8' -> '9'
  assert "997654321" in open(os.path.join(step, "host", "metadata")).read()
  with pytest.raises(tc.CheckpointCorruptError, match=r"host state"):
    restore(tmp_path)


def test_a_changed_config_record_is_detected(tmp_path):
  step = saved(tmp_path)
  flip_bit(os.path.join(step, "config", "metadata"), "0003", 0x01)  # lr 0.0003 -> 0.1003
  assert "0.1003" in open(os.path.join(step, "config", "metadata")).read()
  with pytest.raises(tc.CheckpointCorruptError, match=r"its config state"):
    restore(tmp_path)


def test_changed_metadata_is_detected(tmp_path):
  """A digest edited to fit a tampered host file is caught by meta's own digest."""
  step = saved(tmp_path)
  meta_path = os.path.join(step, "meta", "metadata")
  meta = json.load(open(meta_path))
  meta["checksums"]["['params']['w']"][0] ^= 1
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(tc.CheckpointCorruptError, match=r"metadata differs .*meta_sha256"):
    restore(tmp_path)


@pytest.mark.parametrize("deleted", ["checksums", "host_sha256", "meta_sha256"])
def test_deleted_checksums_are_an_error_unless_allowed(tmp_path, deleted):
  step = saved(tmp_path)
  meta_path = os.path.join(step, "meta", "metadata")
  meta = json.load(open(meta_path))
  del meta[deleted]
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(tc.CheckpointCorruptError,
                     match=rf"has no {deleted}.*checkpoint\.allow_unverified=True"):
    restore(tmp_path)
  _, host = restore(tmp_path, allow_unverified=True)  # on purpose: resumes
  assert host.streams["text"]["next_index"] == POSITION


def test_allow_unverified_is_a_validated_config_field():
  cfg = default_config.get("copd", "micro")
  assert cfg.checkpoint.allow_unverified is False
  with cfg.checkpoint.ignore_type():
    cfg.checkpoint.allow_unverified = 1
  with pytest.raises(ValueError, match=r"config\.checkpoint\.allow_unverified must be True "
                                       "or False"):
    config_lib.validate_config(cfg)


# ------------------------------------------- the base policy and final parameters


def saved_policy(tmp_path):
  from copd_jax import checkpoint
  import numpy as np
  # Random values do not compress: their bytes lie verbatim in orbax's data file.
  bits = np.random.default_rng(1).integers(0, 2 ** 32, size=(64, 64), dtype=np.uint32)
  params = {"w": jnp.asarray((bits & np.uint32(0xBFFFFFFF)).view(np.float32))}  # finite
  directory = str(tmp_path / "policy")
  checkpoint.save_policy(directory, params, {"method": "copd", "branches": ["text"]})
  abstract = jax.tree.map(ocp_utils.to_shape_dtype_struct, params)
  return directory, params, abstract


def test_a_policy_round_trips_with_its_checksums(tmp_path):
  from copd_jax import checkpoint
  directory, params, abstract = saved_policy(tmp_path)
  assert checkpoint.read_metadata(directory) == {"method": "copd", "branches": ["text"]}
  restored = checkpoint.load_policy(directory, abstract)
  assert (restored["w"] == params["w"]).all()


def test_a_flipped_byte_in_a_policy_is_named(tmp_path):
  import numpy as np

  from copd_jax import checkpoint
  directory, params, abstract = saved_policy(tmp_path)
  needle = np.asarray(params["w"]).tobytes()[4096:4160]
  for root, _, files in os.walk(os.path.join(directory, "params")):
    for name in files:
      path = os.path.join(root, name)
      data = bytearray(open(path, "rb").read())
      at = data.find(needle)
      if at >= 0:
        data[at] ^= 0x01
        open(path, "wb").write(bytes(data))
        break
    else:
      continue
    break
  else:
    raise AssertionError("array bytes not found uncompressed")
  with pytest.raises(checkpoint.CheckpointCorruptError, match=r"is corrupt: .*\['w'\]"):
    checkpoint.load_policy(directory, abstract)


def test_a_policy_without_checksums_is_an_error_unless_allowed(tmp_path):
  from copd_jax import checkpoint
  directory, params, abstract = saved_policy(tmp_path)
  path = os.path.join(directory, "metadata.json")
  stored = json.load(open(path))
  del stored["integrity"]
  json.dump(stored, open(path, "w"))
  with pytest.raises(checkpoint.CheckpointCorruptError, match=r"has no checksums .*"
                                                              "allow_unverified=True"):
    checkpoint.load_policy(directory, abstract)
  restored = checkpoint.load_policy(directory, abstract, allow_unverified=True)
  assert (restored["w"] == params["w"]).all()


def test_edited_policy_metadata_is_named(tmp_path):
  from copd_jax import checkpoint
  directory, _, abstract = saved_policy(tmp_path)
  path = os.path.join(directory, "metadata.json")
  stored = json.load(open(path))
  stored["branches"] = ["image"]
  json.dump(stored, open(path, "w"))
  with pytest.raises(checkpoint.CheckpointCorruptError, match=r"metadata differs"):
    checkpoint.load_policy(directory, abstract)
