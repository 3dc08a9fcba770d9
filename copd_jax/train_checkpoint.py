"""Training-state checkpoints: exact resume of a stage after preemption or a crash.

Layout (one orbax CheckpointManager per stage of the method):

    <workdir>/checkpoints/<stage_name>/<step>/
        state/    params + optimizer state (stacked [S] pytrees, orbax StandardSave)
        host/     HostState as JSON: stage step, global step, numpy Generator state of the
                  prompt picker, schedule state, last overlap, data-stream states,
                  non-finite counters, metrics.jsonl byte offset, finished flag
        meta/     what the checkpoint belongs to: method, stage, branches, expert count,
                  seed, parameter shapes (compared before anything is restored)
        config/   the run config (JSON, for the record; not compared)
    <workdir>/checkpoints/log_start.json   metrics.jsonl size when RL training first began

`<step>` counts the optimizer steps done in that stage. orbax writes every step to
`<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a save cut short never
replaces the last good checkpoint; leftovers are ignored (and cleaned up).

The jax PRNG key is not stored: it is derived from (config.seed, stage) and folded with the
step, so it is a pure function of the restored step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import sys
import threading
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from copd_jax.checkpoint import CheckpointCorruptError, CheckpointMismatchError
from copd_jax.checksums import (  # noqa: F401  (re-exported: the checkpoint checks use them)
    array_checksums, checksum_mismatches, json_digest)
from copd_jax.data import streams as data_lib

FORMAT_VERSION = 1
LOG_START_FILE = "log_start.json"


class CheckpointWriteError(OSError):
  """A training checkpoint could not be written (a full disk, ...); names the directory."""


class StorageError(OSError):
  """The run stopped because a log or checkpoint could not be written."""


class NonFiniteTrainingError(FloatingPointError):
  """Training produced non-finite losses, gradients or parameters."""


class Preempted(Exception):
  """Raised at a step boundary after a stop signal (SIGTERM) once the state is saved."""

  def __init__(self, stage: str, step: int, directory: str, signal_name: str):
    self.stage, self.step, self.directory, self.signal_name = stage, step, directory, signal_name
    super().__init__(f"received {signal_name}: saved stage {stage!r} at step {step} to "
                     f"{directory}; run the same command again to resume")


# ---------------------------------------------------------------- checkpointable data


def _json_safe(value: Any) -> Any:
  """Numpy scalars/arrays (grain states may hold them) -> plain JSON values."""
  def default(x):
    if isinstance(x, (np.generic, np.ndarray)):
      return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")
  return json.loads(json.dumps(value, default=default))


def check_streams_checkpointable(streams: Mapping[str, Iterator]) -> None:
  for name, stream in streams.items():
    if not (hasattr(stream, "get_state") and hasattr(stream, "set_state")):
      raise TypeError(f"data stream {name!r} ({type(stream).__name__}) has no get_state/"
                      "set_state, so its position cannot be checkpointed")


def streams_state(streams: Mapping[str, Iterator]) -> dict:
  """{name: JSON state} of the data streams (copd_jax.data.streams.streams_state, made JSON-safe)."""
  return _json_safe(data_lib.streams_state(streams))


def restore_streams(streams: Mapping[str, Iterator], stored: Mapping[str, Any]) -> None:
  """copd_jax.data.streams.restore_streams; a state that does not fit is a checkpoint mismatch."""
  try:
    data_lib.restore_streams(streams, stored)
  except ValueError as err:
    raise CheckpointMismatchError(f"checkpoint data streams {sorted(stored)} do not fit this "
                                  f"run: {err}") from err


# ------------------------------------------------------------------------ host state


@dataclasses.dataclass
class HostState:
  """Everything besides arrays that the loop needs to continue bit-exactly."""
  stage_step: int               # optimizer steps done in this stage
  global_step: int              # optimizer steps over all stages
  finished: bool                # the stage ran to its end
  numpy_rng: dict               # np.random.Generator.bit_generator.state of the prompt picker
  schedule: dict                # dataclasses.asdict(schedules.ScheduleState)
  last_overlap: float | None    # the latest measured branch overlap (adaptive schedule)
  streams: dict                 # streams_state(...)
  nonfinite_total: int = 0      # skipped (non-finite) branch updates in this stage so far
  nonfinite_in_row: int = 0     # the most any branch has skipped in a row just now
  metrics_offset: int = 0       # metrics.jsonl size in bytes when this state was saved
  applied_per_branch: list | None = None   # updates applied per branch in this stage
  skipped_per_branch: list | None = None   # updates skipped (non-finite) per branch
  in_row_per_branch: list | None = None    # ... of those, the latest ones in a row
  steps_with_skips: int = 0     # steps in which some branch's update was skipped

  def to_json(self) -> dict:
    return _json_safe(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, data: Mapping[str, Any], where: str) -> "HostState":
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(n for n in names if n not in data and
                     cls.__dataclass_fields__[n].default is dataclasses.MISSING)
    if missing:
      raise CheckpointMismatchError(f"host state in {where} lacks fields {missing}")
    return cls(**{k: v for k, v in data.items() if k in names})


# ------------------------------------------------------------------- finiteness checks


@jax.jit
def _finite_per_branch(tree) -> jax.Array:
  """bool[S]: every element of branch s of a stacked pytree is finite."""
  flags = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
           for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(flags).all(axis=0)


def nonfinite_branches(stacked_params, branch_names) -> list[str]:
  """The names of branches whose parameters hold a NaN or inf (a LoRA run: whose
  adapters do; its frozen base never changes)."""
  from copd_jax import sharding as sharding_lib
  from copd_jax.models import lora
  ok = np.asarray(sharding_lib.to_host(_finite_per_branch(lora.trainable(stacked_params))))
  return [name for name, good in zip(branch_names, ok) if not good]


def _first_lines(err: BaseException) -> str:
  """The first line of an error and of each error that caused it (tensorstore appends a
  spec dump of a hundred lines that would bury the message)."""
  parts, seen = [], set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    line = (str(err).splitlines() or [""])[0].split(" See full TensorStore details")[0]
    parts.append(f"{type(err).__name__}: {line[:300]}")
    err = err.__cause__ or err.__context__
  return " <- ".join(parts)


# The digests a checkpoint's meta item carries besides the array checksums: of the host
# state (stream positions, RNG, schedule, counters), of the config, and of meta itself.
DIGEST_KEYS = ("checksums", "host_sha256", "config_sha256", "meta_sha256")


def with_meta_digest(meta: dict) -> dict:
  body = {k: v for k, v in meta.items() if k != "meta_sha256"}
  return dict(body, meta_sha256=json_digest(body))


def param_shapes(tree) -> dict[str, list[int]]:
  return {jax.tree_util.keystr(k): list(np.shape(v))
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


# --------------------------------------------------------------------- checkpointers


def _diff(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  out = []
  for key in expected:
    if key == "param_shapes":
      continue
    if key not in stored:
      out.append(f"{key}: missing in checkpoint (run has {expected[key]!r})")
    elif json.dumps(stored[key]) != json.dumps(expected[key]):
      out.append(f"{key}: checkpoint has {stored[key]!r}, run has {expected[key]!r}")
  have, want = stored.get("param_shapes", {}), expected["param_shapes"]
  out += [f"parameter {k}: missing in checkpoint" for k in sorted(set(want) - set(have))]
  out += [f"parameter {k}: only in checkpoint" for k in sorted(set(have) - set(want))]
  out += [f"parameter {k}: checkpoint shape {tuple(have[k])}, run has {tuple(want[k])}"
          for k in sorted(set(have) & set(want)) if have[k] != want[k]]
  return out


class StageCheckpointer:
  """Saves and restores one stage's training state under `directory` (orbax manager)."""

  def __init__(self, directory: str, metadata: dict, config_json: dict, *, max_to_keep: int,
               async_save: bool, allow_unverified: bool = False):
    self.directory = os.path.abspath(directory)
    self.allow_unverified = allow_unverified
    self.metadata = _json_safe(metadata)
    self._config = config_json
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)  # leftovers of a save cut short
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: dict, host: HostState, branch_names) -> None:
    """Starts saving `state` ({'params', 'opt_state'}, stacked [S]) at host.stage_step.

    Refuses (NonFiniteTrainingError) to write non-finite parameters."""
    bad = nonfinite_branches(state["params"], branch_names)
    if bad:
      raise NonFiniteTrainingError(
          f"refusing to checkpoint stage {self.metadata['stage']!r} at step {host.stage_step}: "
          f"parameters of branch(es) {bad} are not finite")
    # Checksums of what is saved (computed on device before the asynchronous write
    # starts), verified on restore: a flipped byte on disk is named, not trained on.
    # The host state and the config are checksummed too: a flipped digit in a stream
    # position would otherwise resume silently on other data.
    host_json = host.to_json()
    meta = with_meta_digest(dict(
        self.metadata, param_shapes=param_shapes(state["params"]),
        checksums=array_checksums(state), host_sha256=json_digest(host_json),
        config_sha256=json_digest(_json_safe(self._config))))
    with self._write_errors(host.stage_step):
      self._manager.save(host.stage_step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_json),
          meta=ocp.args.JsonSave(meta), config=ocp.args.JsonSave(self._config)), force=True)

  @contextlib.contextmanager
  def _write_errors(self, step=None):
    """orbax reports a failed write (ENOSPC arrives as ValueError RESOURCE_EXHAUSTED from
    tensorstore) in many types: one CheckpointWriteError naming the directory instead.
    orbax writes into a temporary directory, so the last complete step stays intact."""
    try:
      yield
    except Exception as e:
      where = self.directory if step is None else os.path.join(self.directory, str(step))
      detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
      raise CheckpointWriteError(errno.ENOSPC if "No space left" in str(e) else None,
                                 f"cannot write the training checkpoint ({detail})",
                                 where) from e

  def restore_latest(self, abstract_state: dict, fallback_on_corrupt: bool = False
                     ) -> tuple[dict, HostState] | None:
    """The latest saved (state, HostState), or None when this stage has no checkpoint.

    abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) shaped like the
    saved state; restored arrays take its shardings, so the mesh may differ from the
    saver's. Raises CheckpointMismatchError naming what differs, or what is unreadable,
    and CheckpointCorruptError naming the arrays whose checksums do not match; with
    fallback_on_corrupt, a corrupt or unreadable step is reported and the next older
    one is tried instead."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    for n, step in enumerate(steps):
      try:
        return self._restore_step(step, abstract_state)
      except CheckpointMismatchError as e:
        corrupt = isinstance(e, CheckpointCorruptError) or "cannot restore" in str(e)
        if not (fallback_on_corrupt and corrupt) or n + 1 == len(steps):
          raise
        print(f"warning: {e}\nfalling back to the previous checkpoint "
              f"(config.checkpoint.fallback_on_corrupt)", flush=True)
    return None

  def _restore_step(self, step: int, abstract_state: dict) -> tuple[dict, HostState]:
    where = os.path.join(self.directory, str(step))
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # truncated / foreign directory
      raise CheckpointMismatchError(f"cannot read checkpoint metadata in {where}: {e}") from e
    meta = meta or {}
    self._verify_meta(meta, where)
    expected = dict(self.metadata, param_shapes=param_shapes(abstract_state["params"]))
    diffs = _diff(meta, expected)
    if diffs:
      raise CheckpointMismatchError(
          f"training checkpoint {where} does not match this run (delete it or use another "
          "workdir to start over):\n  " + "\n  ".join(diffs[:20]))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointMismatchError(f"cannot restore training state from {where} (truncated "
                                    f"or corrupted files?): {_first_lines(e)}") from None
    state = dict(restored["state"])
    for item, key in (("host", "host_sha256"), ("config", "config_sha256")):
      if key in meta and json_digest(restored[item]) != meta[key]:
        raise CheckpointCorruptError(
            f"training checkpoint {where} is corrupt: its {item} state (JSON) differs from "
            f"the checksum saved with it ({key}). Delete this step to resume from an older "
            "one, or set config.checkpoint.fallback_on_corrupt=True")
    if "checksums" in meta:  # only absent with checkpoint.allow_unverified
      bad = checksum_mismatches(meta["checksums"], state)
      if bad:
        raise CheckpointCorruptError(
            f"training checkpoint {where} is corrupt: the checksums of {len(bad)} array(s) "
            f"differ from those saved: {', '.join(bad[:10])}. Delete this step to resume "
            "from an older one, or set config.checkpoint.fallback_on_corrupt=True")
    host = HostState.from_json(restored["host"], where)
    if host.stage_step != step:
      raise CheckpointMismatchError(f"{where}: host state says step {host.stage_step}")
    return state, host

  def _verify_meta(self, meta: Mapping[str, Any], where: str) -> None:
    """meta's own digest must match; checkpoints without digests (written by an older
    version, or with them deleted) are an error unless allow_unverified."""
    missing = [k for k in DIGEST_KEYS if k not in meta]
    if missing:
      if self.allow_unverified:
        print(f"warning: training checkpoint {where} has no {', '.join(missing)}: resuming "
              "it unverified (config.checkpoint.allow_unverified)", flush=True)
        return
      raise CheckpointCorruptError(
          f"training checkpoint {where} has no {', '.join(missing)}, so what it restores "
          "cannot be verified (written by an older version, or the checksums were "
          "removed); set config.checkpoint.allow_unverified=True to resume it anyway")
    if with_meta_digest(dict(meta))["meta_sha256"] != meta["meta_sha256"]:
      raise CheckpointCorruptError(
          f"training checkpoint {where} is corrupt: its metadata differs from the checksum "
          "saved with it (meta_sha256). Delete this step to resume from an older one, or "
          "set config.checkpoint.fallback_on_corrupt=True")

  def wait(self) -> None:
    with self._write_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._write_errors():
      self._manager.close()


class RunCheckpoints:
  """The training checkpoints of one run: <workdir>/checkpoints/<stage>/.

  options: the config.checkpoint section (every_steps, max_to_keep, async_save, resume,
  save_on_sigterm). With resume off, existing checkpoints are an error rather than being
  overwritten or silently ignored.
  """

  def __init__(self, workdir: str, options, *, method: str, num_experts: int, seed: int,
               config_json: dict):
    self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.every_steps = int(options.every_steps)
    self.max_to_keep = int(options.max_to_keep)
    self.async_save = bool(options.async_save)
    self.resume = bool(options.resume)
    self.save_on_sigterm = bool(options.save_on_sigterm)
    self.fallback_on_corrupt = bool(options.get("fallback_on_corrupt", False))
    self.allow_unverified = bool(options.get("allow_unverified", False))
    self.sigterm_grace_s = float(options.get("sigterm_grace_s", 120.0))
    self.method, self.num_experts, self.seed = method, num_experts, seed
    self.config_json = config_json
    if not self.resume:
      existing = self.existing_stages()
      if existing:
        raise CheckpointMismatchError(
            f"{self.root} already holds training checkpoints for {existing} and "
            "config.checkpoint.resume is False; delete them, use another workdir, or resume")

  def existing_stages(self) -> list[str]:
    if not os.path.isdir(self.root):
      return []
    return sorted(d for d in os.listdir(self.root)
                  if os.path.isdir(os.path.join(self.root, d)) and any(
                      name.isdigit() for name in os.listdir(os.path.join(self.root, d))))

  def for_stage(self, stage_name: str, branch_names) -> StageCheckpointer:
    metadata = {"format_version": FORMAT_VERSION, "method": self.method, "stage": stage_name,
                "branches": list(branch_names), "num_experts": self.num_experts,
                "seed": self.seed}
    return StageCheckpointer(os.path.join(self.root, stage_name), metadata, self.config_json,
                             max_to_keep=self.max_to_keep, async_save=self.async_save,
                             allow_unverified=self.allow_unverified)

  def log_start_offset(self, current_size: int) -> int:
    """metrics.jsonl size when RL training first began in this workdir (recorded now if
    this is the first time): a restart without any checkpoint rewinds the log to it."""
    path = os.path.join(self.root, LOG_START_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        return int(json.load(f)["metrics_offset"])
    if jax.process_index() == 0:  # process 0 owns metrics.jsonl and this record of it
      os.makedirs(self.root, exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump({"metrics_offset": current_size}, f)
      os.replace(path + ".tmp", path)
    return current_size


# ---------------------------------------------------------------------- stop signals


class StopRequest:
  """Set by a signal handler; read by the training loop at step boundaries."""

  def __init__(self):
    self.signal_name: str | None = None

  @property
  def requested(self) -> bool:
    return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals(enabled: bool, signals=(signal.SIGTERM,), grace_s: float = 120.0):
  """Within the block, the given signals only set the yielded StopRequest (the loop saves
  at the next step boundary and raises Preempted); the old handlers come back after.

  The process still ends in bounded time: if it has not left the block `grace_s`
  seconds after the first signal (stuck in a write, a compile, a hung answer), or when a
  second signal arrives, it exits at once with status 128 + signal number, without
  saving -- the newest checkpoint on disk stays the one to resume from."""
  request = StopRequest()
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield request
    return
  done = threading.Event()

  def force_exit(signum: int, why: str):
    if done.is_set():
      return
    sys.stderr.write(f"{signal.Signals(signum).name}: {why}; exiting without saving (the "
                     "newest checkpoint on disk is kept)\n")
    sys.stderr.flush()
    os._exit(128 + signum)

  def handler(signum, frame):  # only records: never save from inside a handler
    if request.requested:
      force_exit(signum, "second signal")
    request.signal_name = signal.Signals(signum).name
    timer = threading.Timer(grace_s, force_exit, args=(
        signum, f"the run did not reach a step boundary within {grace_s:g} s"))
    timer.daemon = True
    timer.start()

  previous = {s: signal.signal(s, handler) for s in signals}
  try:
    yield request
  finally:
    done.set()
    for s, h in previous.items():
      signal.signal(s, h)
