"""Where a run's numbers go: TensorBoard event files, a JSONL log and a progress line."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX import writer as tbx_writer
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


class MetricsWriter:
  """Writes scalars to TensorBoard (tensorboardX: no tensorflow needed) and to JSONL.

  `<workdir>/tb/` holds the event files, `<workdir>/metrics.jsonl` one JSON object per
  `write` call with its step. Both are written synchronously and flushed at every
  `write`: a failure (a full disk) raises LogWriteError naming the file at once, and a
  line that could not be written whole is cut off again, so metrics.jsonl never holds a
  partial line.
  """

  def __init__(self, workdir: str):
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    try:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(self.jsonl_path, "a")
    except OSError as e:
      _raise_write_error(e, "the metrics log", self.jsonl_path)
    self._tb = SyncSummaryWriter(os.path.join(workdir, "tb"))
    self._failed = False

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    record = {"step": int(step)}
    try:
      for name, value in scalars.items():
        value = _plain(value)
        record[name] = value
        self._tb.add_scalar(name, value, int(step))
      self._tb.flush()
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

  def jsonl_size(self) -> int:
    """Bytes written to metrics.jsonl so far (a checkpoint stores it to rewind to)."""
    self._jsonl.flush()
    return os.fstat(self._jsonl.fileno()).st_size

  def rewind_jsonl(self, size: int) -> bool:
    """Drops what a killed run wrote after a checkpoint: truncates metrics.jsonl to `size`
    bytes, so a resumed run's log equals an uninterrupted run's. TensorBoard events are
    append-only and keep the killed run's points (TensorBoard shows the latest per step).

    Returns False (and changes nothing) when the file is already shorter than `size`,
    e.g. deleted by hand: it must never be padded."""
    current = self.jsonl_size()
    if current < size:
      return False
    os.truncate(self.jsonl_path, size)  # the file is in append mode: writes go to the end
    return True

  def close(self) -> None:
    """Closes both files; after a failed write, errors of the close are not raised again
    (the first one, naming the file, is what the caller reports)."""
    for close in (self._tb.close, self._jsonl.close):
      try:
        close()
      except OSError:
        if not self._failed:
          raise


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
