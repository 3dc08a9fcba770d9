"""A run directory belongs to one training config; runs get deterministic names.

* `training_config(cfg)`: the fields that decide what a run computes, flattened to dotted
  names. Everything else is operational (where files go, how often to log, checkpoint
  cadence, the mesh, kernel tiles, evaluation sizes): it may change between a run and its
  resume.
* `config_hash(cfg)`: a short hash of the training config.
* `run_name(cfg, overrides)`: `<method>[-<overrides>]-<hash>`, the directory under `runs/`
  that a command without `--config.workdir` writes to. The same command resumes its own
  run; a changed config gets a directory of its own.
* `check_workdir(cfg)`: before anything is written, an existing run directory must hold a
  run of the same method and training config. Otherwise WorkdirConfigError names the
  differing fields. `config.checkpoint.resume_changed_config=True` resumes a run with a
  changed training config on purpose (never with another method); the replaced
  config.json is kept as `config.replaced.<n>.json`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping

from copd_jax.checkpoint import CheckpointMismatchError
from copd_jax.run_spec import RunSpec

CONFIG_FILE = "config.json"
# What a run leaves in its directory (main.run, methods.run_rl_method).
RUN_ARTIFACTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "final_params",
                 "tb", "completions.jsonl")
# Dotted prefixes of operational fields: they never change what a run computes.
OPERATIONAL_FIELDS = (
    "workdir", "checkpoint", "mesh", "pod", "eval", "log",
    "warm_start.checkpoint_dir", "warm_start.reuse_checkpoint", "warm_start.log_every",
    "rl.log_every", "rl.eval_every", "rl.eval_examples", "rl.kernel", "rl.micro_batch_rows",
    "model.remat",
    # How, not what: the same values computed another way (attention blocks / kernel), read
    # by another reader, or verified by more worker processes.
    "model.attention_block", "model.attention_kernel", "data.reader", "reward.workers",
)
STRUCTURE_HASH_CHARS = 6
HASH_CHARS = 8
MAX_NAME_CHARS = 120


class WorkdirConfigError(CheckpointMismatchError):
  """An existing run directory belongs to another method or training config."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}. An empty dict stays a leaf ({} is a value)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _is_operational(name: str) -> bool:
  return any(name == p or name.startswith(p + ".") for p in OPERATIONAL_FIELDS)


def config_as_json(cfg: "RunSpec | Mapping") -> dict:
  """The config as plain JSON values (tuples become lists), as config.json stores it: a
  RunSpec's resolved config (RunSpec.config_json) or a mapping of the config's fields."""
  if isinstance(cfg, RunSpec):
    cfg = cfg.config_json
  return json.loads(json.dumps(cfg, default=str))


def training_config(cfg: RunSpec | Mapping) -> dict[str, Any]:
  """{dotted field: JSON value} of the fields that decide what the run computes."""
  flat = flatten(config_as_json(cfg))
  return {k: flat[k] for k in sorted(flat) if not _is_operational(k)}


def config_hash(cfg: RunSpec | Mapping) -> str:
  """8 hex digits of the SHA-256 of the training config (sorted JSON)."""
  text = json.dumps(training_config(cfg), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def _name_part(text: str) -> str:
  """Characters safe in a directory name; anything else becomes '_'."""
  return re.sub(r"[^A-Za-z0-9._=+,-]+", "_", text).strip("_")


def _is_structured(value: Any) -> bool:
  """A dict, or a list holding dicts or lists (data.sources, data.columns, ...)."""
  if isinstance(value, Mapping):
    return True
  return isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple))
                                                  for v in value)


def _value_text(value: Any) -> str:
  """How an override's value reads in a run name: a scalar as itself (a path as its last
  part), a flat list joined by '+', a structured value (a dict such as data.sources) as
  'h' + 6 hex digits of the SHA-256 of its sorted JSON, rather than its mangled text."""
  if _is_structured(value):
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return "h" + hashlib.sha256(text.encode()).hexdigest()[:STRUCTURE_HASH_CHARS]
  if isinstance(value, (list, tuple)):
    return "+".join(_value_text(v) for v in value)
  if isinstance(value, str):
    return os.path.basename(value.rstrip("/")) or value
  return str(value)


def run_name(cfg: Mapping, overrides: Mapping[str, Any] = (),
             prefix: str | None = None) -> str:
  """`<prefix>[-<field=value,...>]-<hash>` for the overrides that differ from the preset.

  cfg: the config's fields as JSON (config_as_json).
  prefix: the preset's own run name (e.g. 'copd_micro'); default the config's method.
  overrides: {dotted field: value} given on the command line whose value differs from the
  config file's (workdir never counts). The hash covers the whole training config, so two
  configs never share a name even when their readable part is cut to MAX_NAME_CHARS.
  Example: run_name(copd micro with rl.steps=3, {'rl.steps': 3}, 'copd_micro') ->
  'copd_micro-rl.steps=3-<8 hex>'."""
  parts = [f"{k}={_value_text(v)}" for k, v in sorted(dict(overrides).items())
           if not _is_name_excluded(k)]
  label = _name_part(",".join(parts))
  name = _name_part(prefix or cfg["method"]) + (f"-{label}" if label else "")
  suffix = f"-{config_hash(cfg)}"
  return name[:MAX_NAME_CHARS - len(suffix)].rstrip("-,_") + suffix


def _is_name_excluded(field: str) -> bool:
  """Operational overrides stay out of the name: adding --config.checkpoint.every_steps=5
  to a command still resumes the same run."""
  return _is_operational(field)


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """'field: directory has X, this run has Y' for every training field that differs.

  A field the stored config does not have at all (written by an older version of this
  code, before the field existed) is not a difference."""
  out = []
  for key in sorted(set(stored) | set(current)):
    if key not in stored:
      continue
    if key not in current:
      out.append(f"{key}: directory has {stored[key]!r}, this run has no such field")
    elif json.dumps(stored[key], sort_keys=True) != json.dumps(current[key], sort_keys=True):
      out.append(f"{key}: directory has {stored[key]!r}, this run has {current[key]!r}")
  return out


def existing_artifacts(workdir: str) -> list[str]:
  if not os.path.isdir(workdir):
    return []
  return [name for name in RUN_ARTIFACTS if os.path.exists(os.path.join(workdir, name))]


def read_stored_config(workdir: str) -> dict | None:
  """The config.json of a run directory, or None when the directory holds no run.

  Raises WorkdirConfigError when the directory holds run files but no readable config."""
  found = existing_artifacts(workdir)
  if not found:
    return None
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise WorkdirConfigError(
        f"{workdir} holds a run ({', '.join(found)}) without {CONFIG_FILE}, so it cannot be "
        "told whether it belongs to this config; use another config.workdir")
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WorkdirConfigError(f"{path} is not readable JSON ({e}); use another "
                             "config.workdir") from None
  if not isinstance(stored, dict):
    raise WorkdirConfigError(f"{path} does not hold a config (a JSON object)")
  return stored


def check_workdir(cfg: RunSpec) -> dict | None:
  """Raises WorkdirConfigError when cfg.workdir holds a run of another method or training
  config (unless config.checkpoint.resume_changed_config, which never covers a method
  change). Reads only: nothing in the directory is changed. Returns the stored config
  (None for a new directory). A workdir (or warm-start directory) that is a regular file
  is an error too."""
  check_not_a_file("workdir", cfg.workdir)
  if cfg.warm_start.checkpoint_dir:
    check_not_a_file("warm_start.checkpoint_dir", cfg.warm_start.checkpoint_dir)
  stored = read_stored_config(cfg.workdir)
  if stored is None:
    return None
  if stored.get("method") != cfg.method:
    raise WorkdirConfigError(
        f"{cfg.workdir} holds a {stored.get('method')!r} run, not {cfg.method!r}: a run "
        "directory belongs to one method. Use another config.workdir (or leave it unset: "
        "each config gets a run name of its own under runs/)")
  diffs = differences(training_config(stored), training_config(cfg))
  if diffs and not cfg.checkpoint.resume_changed_config:
    raise WorkdirConfigError(
        f"{cfg.workdir} belongs to another training config; differing fields:\n  "
        + "\n  ".join(diffs[:30]) + "\nUse another config.workdir (or leave it unset: each "
        "config gets a run name of its own under runs/), or pass "
        "--config.checkpoint.resume_changed_config=True to resume this run with the new "
        "values on purpose")
  return stored


def write_config(cfg: RunSpec, stored: dict | None) -> None:
  """Writes <workdir>/config.json. When the training config changed on purpose
  (resume_changed_config), the replaced file is kept as config.replaced.<n>.json."""
  path = os.path.join(cfg.workdir, CONFIG_FILE)
  if stored is not None and differences(training_config(stored), training_config(cfg)):
    n = 1
    while os.path.exists(os.path.join(cfg.workdir, f"config.replaced.{n}.json")):
      n += 1
    os.replace(path, os.path.join(cfg.workdir, f"config.replaced.{n}.json"))
  with open(path + ".tmp", "w") as f:
    json.dump(cfg.config_json, f, indent=2)
  os.replace(path + ".tmp", path)


# ------------------------------------------------------------------- one writer at a time

LOCK_FILE = ".copd-jax.lock"


class DirectoryLockedError(OSError):
  """Another live process holds the write lock of a run or warm-start directory."""


def check_not_a_file(field: str, path: str) -> None:
  """A directory setting that names an existing regular file (or anything not a
  directory) is an error naming the field, before anything tries to write into it."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"config.{field} must be a directory, but {path} is a file "
                             "(or another non-directory); use another path")


def _holder(path: str) -> str:
  """The pid a lock file names (the holder wrote it), or '?' if unreadable."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read(64).strip()
  except OSError:
    return "?"
  return text if text.isdigit() else "?"


class DirectoryLock:
  """An exclusive, non-blocking `fcntl.flock` on <directory>/.copd-jax.lock: one writer
  per directory. The lock file holds the holder's pid (for the error message only: the
  kernel, not the pid, decides who holds the lock, so a lock file left by a killed
  process is simply taken over). The file is removed on release; a process that opened
  the old file just before is caught by comparing inodes after locking.

  Use as a context manager; the directory is created if missing."""

  def __init__(self, directory: str, what: str = "run directory"):
    self.directory, self.what = directory, what
    self.path = os.path.join(directory, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> "DirectoryLock":
    import fcntl
    os.makedirs(self.directory, exist_ok=True)
    for _ in range(100):  # only repeats when a holder removed the file meanwhile
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise DirectoryLockedError(
            f"{self.what} {self.directory} is in use by another process (pid "
            f"{_holder(self.path)} holds the lock {self.path}); wait for it to finish, stop "
            "it, or use another directory") from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self
      os.close(fd)  # locked a file its holder had just removed: try the new one
    raise DirectoryLockedError(f"could not lock {self.path}: it keeps being replaced")

  def release(self) -> None:
    if self._fd is None:
      return
    import fcntl
    try:
      os.unlink(self.path)  # still holding the lock: nobody else owns this file
    except OSError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "DirectoryLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
