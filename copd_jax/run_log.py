"""Where a run's numbers go: TensorBoard event files, a JSONL log and a progress line."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping, Sequence

import numpy as np
from tensorboardX import SummaryWriter, writer as tbx_writer
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog


class LogWriteError(OSError):
  """A run's log file could not be written (a full disk, ...); names the file."""


def _raise_write_error(err: OSError, what: str, path: str):
  raise LogWriteError(err.errno, f"cannot write {what} ({err.strerror or err})", path) from err


class _SyncEventFileWriter:
  """tensorboardX's EventFileWriter interface, writing in the caller's thread.

  tensorboardX writes events from a background thread behind a bounded queue; when that
  thread dies on a write error (ENOSPC) the queue fills and the next write blocks
  forever. Here a failed write raises LogWriteError naming the event file instead."""

  def __init__(self, logdir: str, filename_suffix: str = ""):
    self._logdir = logdir
    self.path = os.path.join(logdir, "events")
    try:
      os.makedirs(logdir, exist_ok=True)
      self._writer = EventsWriter(self.path, filename_suffix)  # writes the version event
      self.path = self._writer._file_name
      self._writer.flush()
    except OSError as e:
      _raise_write_error(e, "TensorBoard events", self.path)
    self._closed = False

  def get_logdir(self) -> str:
    return self._logdir

  def _guarded(self, fn, *args):
    try:
      return fn(*args)
    except OSError as e:
      _raise_write_error(e, "TensorBoard events", self.path)

  def add_event(self, event) -> None:
    if not self._closed:
      self._guarded(self._writer.write_event, event)

  def flush(self) -> None:
    if not self._closed:
      self._guarded(self._writer.flush)

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._guarded(self._writer.close)

  def reopen(self) -> None:
    pass


class _SyncFileWriter(tbx_writer.FileWriter):
  """tensorboardX's FileWriter over _SyncEventFileWriter (no thread, no queue)."""

  def __init__(self, logdir, max_queue=10, flush_secs=120, filename_suffix=""):
    del max_queue, flush_secs
    self.event_writer = _SyncEventFileWriter(str(logdir), filename_suffix)
    self._default_metadata = {}


class SyncSummaryWriter(SummaryWriter):
  """tensorboardX's SummaryWriter (same API: add_scalar, add_text, purge_step, ...) whose
  events are written synchronously, so a write error surfaces at the call that failed."""

  def _get_file_writer(self):
    if not self._write_to_disk:
      return super()._get_file_writer()
    if self.all_writers is None or self.file_writer is None:
      self.file_writer = _SyncFileWriter(self.logdir, filename_suffix=self._filename_suffix)
      if self.purge_step is not None:
        self.file_writer.add_event(Event(step=self.purge_step, file_version="brain.Event:2"))
        self.file_writer.add_event(
            Event(step=self.purge_step, session_log=SessionLog(status=SessionLog.START)))
      self.all_writers = {self.file_writer.get_logdir(): self.file_writer}
    return self.file_writer


def _plain(value):
  """Makes numpy/jax scalars JSON-serialisable."""
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "item"):
    return np.asarray(value).item()
  return value


WARM_START_PREFIX = "warm_start/"
COMPLETIONS_FILE = "completions.jsonl"


def summary_writer(logdir: str, purge_step: int | None = None) -> SummaryWriter:
  """A tensorboardX writer whose event file name is unique and sorts after earlier ones:
  tensorboardX names files by the second and opens them with 'wb', so a writer reopened
  within the same second (a resume's purge) would otherwise overwrite the last file."""
  # Synchronous (SyncSummaryWriter): a failed write (a full disk) raises LogWriteError
  # naming the file instead of blocking a dead writer thread's queue.
  return SyncSummaryWriter(logdir, purge_step=purge_step, filename_suffix=f".{time.time_ns()}")


def flat_hparams(config_json: Mapping, prefix: str = "") -> dict:
  """{dotted field: int | float | str | bool} of a JSON config (lists joined as text):
  the hyperparameters TensorBoard's HPARAMS tab accepts."""
  out = {}
  for key, value in config_json.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flat_hparams(value, name + ".") if value else {name: "{}"})
    elif isinstance(value, (bool, int, float, str)):
      out[name] = value
    else:
      out[name] = json.dumps(value)
  return out


def completions_markdown(records: Sequence[Mapping]) -> str:
  """A markdown table of completion records (TensorBoard renders text as markdown)."""
  def cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", "<br>")[:400]
  columns = [c for c in ("branch", "row", "capability", "prompt", "answer", "response",
                         "reward", "teacher_log_ratio") if any(c in r for r in records)]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in records]
  return "\n".join(lines)


class MetricsWriter:
  """Writes scalars to TensorBoard (tensorboardX: no tensorflow needed) and to JSONL.

  `<workdir>/tb/` holds the event files, `<workdir>/metrics.jsonl` one JSON object per
  `write` call with its step. Both are written synchronously and flushed at every
  `write`: a failure (a full disk) raises LogWriteError naming the file at once, and a
  line that could not be written whole is cut off again, so metrics.jsonl never holds a
  partial line. Warm-start scalars (`warm_start/...`, their own step axis)
  go to the separate TensorBoard run `tb/warm_start/`, so purging the training run after
  a resume never touches them. `write_completions` logs sample responses as TensorBoard
  text and to `<workdir>/completions.jsonl`; `write_config` puts the config in the
  TensorBoard HPARAMS and TEXT tabs. With `mirror` (e.g. run_log.WandbMirror) every
  scalar, text and config also goes there.
  """

  def __init__(self, workdir: str, mirror=None):
    self.workdir = workdir
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    try:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(self.jsonl_path, "a")
    except OSError as e:
      _raise_write_error(e, "the metrics log", self.jsonl_path)
    self._tb = summary_writer(os.path.join(workdir, "tb"))
    self._tb_warm_start = None
    self.completions_path = os.path.join(workdir, COMPLETIONS_FILE)
    self.mirror = mirror
    self._failed = False

  def _tb_for(self, tag: str):
    if not tag.startswith(WARM_START_PREFIX):
      return self._tb
    if self._tb_warm_start is None:
      self._tb_warm_start = summary_writer(os.path.join(self.workdir, "tb", "warm_start"))
    return self._tb_warm_start

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    record = {"step": int(step)}
    try:
      used = set()
      for name, value in scalars.items():
        value = _plain(value)
        record[name] = value
        tb = self._tb_for(name)
        tb.add_scalar(name, value, int(step))
        used.add(id(tb))
      for tb in (self._tb, self._tb_warm_start):
        if tb is not None and id(tb) in used:
          tb.flush()
    except LogWriteError:
      self._failed = True
      raise
    size = self.jsonl_size()
    try:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    except OSError as e:
      self._failed = True
      self._drop_partial_line(size)
      _raise_write_error(e, "the metrics log", self.jsonl_path)
    if self.mirror is not None:
      self.mirror.scalars(int(step), record)

  def _drop_partial_line(self, size: int) -> None:
    """After a failed write: forget what the buffer holds and cut the file back to
    `size` bytes (truncating needs no free space)."""
    try:
      self._jsonl.close()
    except OSError:
      pass  # the buffered rest of the line could not be written either
    try:
      os.truncate(self.jsonl_path, size)
    except OSError:
      pass
    self._jsonl = open(self.jsonl_path, "a")

  def write_completions(self, step: int, tag: str, records: Sequence[Mapping]) -> None:
    """Sample responses at `step`: one JSON line each in completions.jsonl (with step and
    tag), and one markdown table as TensorBoard text under `completions/<tag>`."""
    if not records:
      return
    with open(self.completions_path, "a", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps({"step": int(step), "tag": tag, **r}, default=_plain) + "\n")
    table = completions_markdown(records)
    self._tb.add_text(f"completions/{tag}", table, int(step))
    if self.mirror is not None:
      self.mirror.text(int(step), f"completions/{tag}", records)

  def write_config(self, config_json: Mapping, metric_tags: Sequence[str] = ()) -> None:
    """The run config as TensorBoard hyperparameters (HPARAMS tab, in this same run, so
    `metric_tags` such as 'eval/accuracy/overall' line up with them) and as JSON text."""
    from tensorboardX.summary import hparams
    flat = flat_hparams(config_json)
    experiment, start, end = hparams(flat, {tag: 0.0 for tag in metric_tags})
    file_writer = self._tb._get_file_writer()  # the run's own event file, not a sub-run
    for summary in (experiment, start, end):
      file_writer.add_summary(summary)
    self._tb.add_text("config", "```\n" + json.dumps(config_json, indent=2) + "\n```", 0)
    if self.mirror is not None:
      self.mirror.config(config_json)

  def jsonl_size(self) -> int:
    """Bytes written to metrics.jsonl so far (a checkpoint stores it to rewind to)."""
    self._jsonl.flush()
    return os.fstat(self._jsonl.fileno()).st_size

  def rewind_jsonl(self, size: int, purge_step: int | None = None) -> bool:
    """Drops what a killed run wrote after a checkpoint: truncates metrics.jsonl to `size`
    bytes, so a resumed run's log equals an uninterrupted run's. With `purge_step`, also
    drops completion lines from that step on and reopens TensorBoard with tensorboardX's
    purge_step, so TensorBoard drops the killed run's points from that step on and the
    curves equal an uninterrupted run's.

    Returns False (and changes nothing) when the file is already shorter than `size`,
    e.g. deleted by hand: it must never be padded."""
    current = self.jsonl_size()
    if current < size:
      return False
    os.truncate(self.jsonl_path, size)  # the file is in append mode: writes go to the end
    if purge_step is not None and current > size:  # something was dropped
      self._drop_completions_from(purge_step)
      self._tb.close()
      self._tb = summary_writer(os.path.join(self.workdir, "tb"), purge_step=int(purge_step))
    return True

  def _drop_completions_from(self, step: int) -> None:
    if not os.path.isfile(self.completions_path):
      return
    with open(self.completions_path, encoding="utf-8") as f:
      # "final" completions are always rewritten at the end of a (resumed) run.
      kept = [line for line in f if line.strip() and json.loads(line)["step"] < step
              and json.loads(line).get("tag") != "final"]
    with open(self.completions_path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(self.completions_path + ".tmp", self.completions_path)

  def close(self) -> None:
    """Closes every file; after a failed write, errors of the close are not raised again
    (the first one, naming the file, is what the caller reports)."""
    closers = [self._tb.close, self._jsonl.close]
    if self._tb_warm_start is not None:
      closers.append(self._tb_warm_start.close)
    for close in closers:
      try:
        close()
      except OSError:
        if not self._failed:
          raise
    if self.mirror is not None:
      self.mirror.close()


class WandbMirror:
  """Mirrors MetricsWriter to Weights & Biases (config.log.wandb; off by default).

  mode 'offline' (the default) writes the run under <workdir>/wandb/ with no network;
  `wandb sync` uploads it later. Warm-start scalars keep their own step axis
  (warm_start/step), everything else uses `step`."""

  def __init__(self, workdir: str, *, project: str, mode: str, name: str, config_json: Mapping):
    try:
      import wandb
    except ImportError:
      raise ValueError("config.log.wandb=True needs the wandb package: "
                       "pip install -e '.[wandb]'") from None
    self._wandb = wandb
    self._run = wandb.init(project=project, mode=mode, dir=workdir, name=name,
                           config=dict(config_json), reinit="finish_previous")
    self._run.define_metric("warm_start/step")
    self._run.define_metric("warm_start/*", step_metric="warm_start/step")
    self._run.define_metric("step")
    for prefix in ("train", "eval", "final"):
      self._run.define_metric(f"{prefix}/*", step_metric="step")

  def scalars(self, step: int, record: Mapping) -> None:
    values = {k: v for k, v in record.items() if k != "step"}
    axis = "warm_start/step" if all(k.startswith(WARM_START_PREFIX) for k in values) else "step"
    self._run.log({**values, axis: step})

  def text(self, step: int, tag: str, records: Sequence[Mapping]) -> None:
    columns = sorted({k for r in records for k in r})
    table = self._wandb.Table(columns=columns,
                              data=[[str(r.get(c, "")) for c in columns] for r in records])
    self._run.log({tag: table, "step": step})

  def config(self, config_json: Mapping) -> None:
    self._run.config.update(dict(config_json), allow_val_change=True)

  def close(self) -> None:
    self._run.finish()


class Phase:
  """A long phase on the terminal: `<name> ...` when it starts, `<name> k/n | eta Ns` as
  its parts finish (advance), `<name> done in X.Xs` at the end. Used for compilation,
  evaluation, diagnostics and checkpoint saves. clock: seconds (injectable for tests)."""

  def __init__(self, name: str, total: int = 0, stream=None, clock=time.perf_counter):
    self.name, self.total, self.stream, self.clock = name, total, stream, clock
    self.done = 0
    self._start = None

  def _print(self, text: str) -> None:
    print(text, file=self.stream or sys.stdout, flush=True)

  def __enter__(self) -> "Phase":
    self._start = self.clock()
    self._print(f"{self.name} ...")
    return self

  def advance(self, what: str = "", count: int = 1) -> None:
    self.done += count
    elapsed = self.clock() - self._start
    parts = [f"{self.name} {self.done}/{self.total}" if self.total else self.name]
    if what:
      parts.append(what)
    if self.total and self.done < self.total:
      parts.append(f"eta {elapsed / self.done * (self.total - self.done):.0f}s")
    self._print(" | ".join(parts))

  def __exit__(self, *exc) -> None:
    if exc[0] is None:
      self._print(f"{self.name} done in {self.clock() - self._start:.1f}s")


def branch_line(prefix: str, values: Mapping[str, float]) -> str:
  """'prefix | text 0.312 | image 0.250': a per-branch number as it is measured."""
  return " | ".join([prefix] + [f"{k} {float(v):.3f}" for k, v in values.items()])



class ProgressLine:
  """Prints `name step/total | loss | tokens/s | eta` every `every` steps."""

  def __init__(self, name: str, total_steps: int, every: int, stream=sys.stdout,
               start_step: int = 0):
    """start_step: steps already done (a resumed stage), so the eta counts only new ones."""
    self.name, self.total, self.every, self.stream = name, total_steps, every, stream
    self._first = start_step
    self._start = self._last_time = time.perf_counter()
    self._tokens_since = 0

  def update(self, step: int, tokens: int, **scalars: float) -> None:
    """Call after finishing `step` (1-based) which processed `tokens` tokens."""
    self._tokens_since += tokens
    if step % self.every and step != self.total:
      return
    now = time.perf_counter()
    rate = self._tokens_since / max(now - self._last_time, 1e-9)
    eta = (now - self._start) / max(step - self._first, 1) * (self.total - step)
    parts = [f"{self.name} {step}/{self.total}"]
    parts += [f"{k} {float(v):.4f}" for k, v in scalars.items()]
    parts += [f"{rate:,.0f} tok/s", f"eta {eta:4.0f}s"]
    print(" | ".join(parts), file=self.stream, flush=True)
    self._last_time, self._tokens_since = now, 0
