"""Saving and loading a single policy (the warm-started base) with orbax.

Layout of a policy directory:
    <dir>/params/         orbax StandardCheckpointer tree (float32 parameters)
    <dir>/metadata.json   what produced it (model config, tasks, warm-start recipe)

orbax writes `params/` to a temporary name and renames it when complete, and
metadata.json is written (atomically, via rename) only after that, so a directory
with metadata.json always holds a finished checkpoint. Loading compares the stored
metadata and parameter shapes with what the caller expects and names any difference;
nothing is silently re-initialised.

Integrity: metadata.json also holds `integrity` = the checksums of every parameter array
(checksums.array_checksums) and a SHA-256 of the rest of the metadata. Loading
verifies both (CheckpointCorruptError naming what differs); a policy without them is an
error unless the caller allows unverified checkpoints (config.checkpoint.allow_unverified).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from copd_jax import checksums

PARAMS_SUBDIR = "params"
METADATA_FILE = "metadata.json"


class CheckpointMismatchError(ValueError):
  """A stored checkpoint does not match what the run expects."""


class CheckpointCorruptError(CheckpointMismatchError):
  """Stored data does not match the checksum saved with it (or has none to verify)."""


INTEGRITY_KEY = "integrity"


def has_policy(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, METADATA_FILE))


def save_policy(directory: str, params: Any, metadata: dict) -> None:
  """Writes params (a pytree of arrays) and JSON-serialisable metadata to `directory`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  params_dir = os.path.join(directory, PARAMS_SUBDIR)
  metadata = json.loads(json.dumps(metadata))  # as it will read back (tuples -> lists)
  integrity = {"checksums": checksums.array_checksums(params),  # every process
               "metadata_sha256": checksums.json_digest(metadata)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, params, force=True)  # every process writes its shards
  checkpointer.wait_until_finished()
  if jax.process_index() != 0:  # one writer for the small files
    return
  tmp = os.path.join(directory, METADATA_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(dict(metadata, **{INTEGRITY_KEY: integrity}), f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, METADATA_FILE))


def _read_record(directory: str) -> tuple[dict, dict | None]:
  """(metadata, integrity record or None) of metadata.json."""
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no finished policy checkpoint at {directory} ({METADATA_FILE} missing)")
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
  except (ValueError, RecursionError) as e:  # bad JSON, bytes or nesting
    raise CheckpointCorruptError(f"{path} is not readable JSON ({type(e).__name__})") from None
  if not isinstance(stored, dict):
    raise CheckpointCorruptError(f"{path} does not hold a JSON object")
  integrity = stored.pop(INTEGRITY_KEY, None)
  return stored, integrity


def read_metadata(directory: str) -> dict:
  """What produced the policy at `directory` (metadata.json without its integrity record)."""
  return _read_record(directory)[0]


def _verify_metadata(directory: str, metadata: dict, integrity, allow_unverified: bool) -> bool:
  """Checks metadata against its digest; returns whether the arrays can be verified."""
  where = os.path.join(directory, METADATA_FILE)
  if not isinstance(integrity, dict) or "checksums" not in integrity or \
      "metadata_sha256" not in integrity:
    if allow_unverified:
      print(f"warning: {where} has no checksums: loading it unverified "
            "(config.checkpoint.allow_unverified)", flush=True)
      return False
    raise CheckpointCorruptError(
        f"{where} has no checksums ({INTEGRITY_KEY!r}), so the policy cannot be verified "
        "(written by an older version, or removed); set "
        "config.checkpoint.allow_unverified=True to load it anyway")
  if checksums.json_digest(metadata) != integrity["metadata_sha256"]:
    raise CheckpointCorruptError(f"{where} is corrupt: its metadata differs from the checksum "
                                 "saved with it")
  return True


def _diff_metadata(stored: Any, expected: Any, path: str = "") -> list[str]:
  if isinstance(stored, dict) and isinstance(expected, dict):
    out = []
    for key in sorted(set(stored) | set(expected)):
      sub = f"{path}.{key}" if path else key
      if key not in stored:
        out.append(f"{sub}: missing in checkpoint (expected {expected[key]!r})")
      elif key not in expected:
        out.append(f"{sub}: only in checkpoint ({stored[key]!r})")
      else:
        out += _diff_metadata(stored[key], expected[key], sub)
    return out
  # JSON turns tuples into lists; compare through JSON.
  if json.dumps(stored, sort_keys=True) != json.dumps(expected, sort_keys=True):
    return [f"{path}: checkpoint has {stored!r}, run expects {expected!r}"]
  return []


def _shape_differences(stored_tree: Any, abstract_params: Any) -> list[str]:
  stored = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(stored_tree)}
  wanted = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
  out = [f"{k}: missing in checkpoint" for k in sorted(set(wanted) - set(stored))]
  out += [f"{k}: only in checkpoint" for k in sorted(set(stored) - set(wanted))]
  out += [f"{k}: checkpoint shape {stored[k]}, expected {wanted[k]}"
          for k in sorted(set(stored) & set(wanted)) if stored[k] != wanted[k]]
  return out


def load_policy(directory: str, abstract_params: Any, expected_metadata: dict | None = None,
                *, allow_unverified: bool = False):
  """Restores params shaped like `abstract_params` (a pytree of jax.ShapeDtypeStruct).

  Raises CheckpointMismatchError naming every differing metadata field or parameter, and
  CheckpointCorruptError when the metadata or an array differs from its saved checksum
  (or there are none and not allow_unverified).
  """
  directory = os.path.abspath(directory)
  stored_metadata, integrity = _read_record(directory)
  verify = _verify_metadata(directory, stored_metadata, integrity, allow_unverified)
  if expected_metadata is not None:
    diffs = _diff_metadata(stored_metadata, json.loads(json.dumps(expected_metadata)))
    if diffs:
      raise CheckpointMismatchError(
          f"policy checkpoint at {directory} does not match this run:\n  " + "\n  ".join(diffs))
  checkpointer = ocp.StandardCheckpointer()
  params_dir = os.path.join(directory, PARAMS_SUBDIR)
  try:
    stored_tree = checkpointer.metadata(params_dir).item_metadata.tree
  except Exception as e:  # truncated or foreign directory
    raise CheckpointMismatchError(f"cannot read parameter metadata in {params_dir}: {e}") from e
  diffs = _shape_differences(stored_tree, abstract_params)
  if diffs:
    raise CheckpointMismatchError(
        f"parameters in {params_dir} do not match the model:\n  " + "\n  ".join(diffs[:20]))
  params = checkpointer.restore(params_dir, _with_local_default_sharding(abstract_params))
  if verify:
    bad = checksums.checksum_mismatches(integrity["checksums"], params)
    if bad:
      raise CheckpointCorruptError(
          f"policy checkpoint {params_dir} is corrupt: the checksums of {len(bad)} array(s) "
          f"differ from those saved: {', '.join(bad[:10])}")
  return params


def _with_local_default_sharding(abstract_params: Any) -> Any:
  """Leaves without a sharding are restored onto this process's first device. (Left to
  orbax they would go to jax.devices()[0], which another process owns in a multi-process
  run.)"""
  device = jax.local_devices()[0]

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                  sharding=jax.sharding.SingleDeviceSharding(device))
    return x
  return jax.tree.map(one, abstract_params)
