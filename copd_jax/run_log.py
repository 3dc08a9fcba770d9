"""Where a run's numbers go: TensorBoard event files, a JSONL log and a progress line."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import numpy as np
from tensorboardX import SummaryWriter


def _plain(value):
  """Makes numpy/jax scalars JSON-serialisable."""
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "item"):
    return np.asarray(value).item()
  return value


class MetricsWriter:
  """Writes scalars to TensorBoard (tensorboardX: no tensorflow needed) and to JSONL.

  `<workdir>/tb/` holds the event files, `<workdir>/metrics.jsonl` one JSON object per
  `write` call with its step.
  """

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = open(self.jsonl_path, "a")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    record = {"step": int(step)}
    for name, value in scalars.items():
      value = _plain(value)
      record[name] = value
      self._tb.add_scalar(name, value, int(step))
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

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
    self._tb.close()
    self._jsonl.close()


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
