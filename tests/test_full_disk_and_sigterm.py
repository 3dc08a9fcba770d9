"""A full disk stops a run naming the file; SIGTERM ends a process in bounded time (issue 13.6).

Each case reproduces a failure found by trying the project with bad input and injected faults,
and checks the behaviour that replaced it. Expected values are written out by hand."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import micro_runs
import paths
from copd_jax.config_lib import spec_of

REPO = paths.REPO


@pytest.fixture(scope="module")
def micro_base():
  return micro_runs.micro_base()


# ------------------------------------------- 13.6 a full disk; SIGTERM in bounded time

class _FullDisk:
  """A file object whose writes put `room` more bytes on disk, then fail with ENOSPC."""

  def __init__(self, f, room=10):
    self._f, self._room = f, room

  def write(self, text):
    self._f.write(text[:self._room])
    self._f.flush()
    self._room = 0
    raise OSError(errno.ENOSPC, "No space left on device")

  def __getattr__(self, name):
    return getattr(self._f, name)


def test_metrics_log_on_a_full_disk_raises_naming_the_file(tmp_path):
  from copd_jax.run_log import LogWriteError, MetricsWriter
  w = MetricsWriter(str(tmp_path))
  w.write(1, {"a": 1.0})
  w._jsonl = _FullDisk(w._jsonl)
  with pytest.raises(LogWriteError, match=r"No space left.*metrics\.jsonl"):
    w.write(2, {"a": 2.0})
  w.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
  assert [json.loads(line) for line in lines] == [{"step": 1, "a": 1.0}]  # no partial line


def test_tensorboard_write_error_raises_instead_of_blocking(tmp_path, monkeypatch):
  """tensorboardX's writer thread died on ENOSPC and the next write blocked forever on
  its full queue. Writes run in a thread here so that a hang fails the test."""
  import threading

  from tensorboardX import event_file_writer

  from copd_jax.run_log import LogWriteError, MetricsWriter
  w = MetricsWriter(str(tmp_path))

  def full(self, event_str):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(event_file_writer.EventsWriter, "_write_serialized_event", full)
  raised = []

  def write_many():
    try:
      for step in range(100):
        w.write(step, {"a": 1.0, "b": 2.0})
    except LogWriteError as e:
      raised.append(str(e))
  thread = threading.Thread(target=write_many, daemon=True)
  thread.start()
  thread.join(60)
  assert not thread.is_alive(), "a write blocked after the event writer failed"
  assert raised and "No space left" in raised[0] and "events.out.tfevents" in raised[0]


def _tiny_fs_available() -> bool:
  probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                         capture_output=True) if sys.platform.startswith("linux") else None
  return probe is not None and probe.returncode == 0


@pytest.mark.skipif(not _tiny_fs_available(), reason="needs unshare -rm and tmpfs mounts")
def test_a_real_full_filesystem_stops_the_writer_with_the_path(tmp_path):
  mount = tmp_path / "tiny"
  mount.mkdir()
  code = textwrap.dedent(f"""
      from copd_jax.run_log import LogWriteError, MetricsWriter
      w = MetricsWriter({str(mount / 'run')!r})
      try:
        for step in range(10**6):
          w.write(step, {{"a": 1.0, "b": 2.0}})
      except LogWriteError as e:
        print("ERROR", e)
      w.close()
  """)
  out = subprocess.run(["unshare", "-rm", "sh", "-c",
                        f'mount -t tmpfs -o size=64k tmpfs {mount} && exec {sys.executable} -c "$0"',
                        code], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ERROR [Errno 28]" in out.stdout and str(mount / "run") in out.stdout, out.stdout


def test_full_disk_during_training_stops_with_the_path_and_keeps_the_checkpoint(
    tmp_path, micro_base):
  from copd_jax import train_checkpoint
  from copd_jax.run_log import MetricsWriter

  class DiskFillsAtStep(MetricsWriter):
    fill_at = 2

    def write(self, step, scalars):
      if step >= self.fill_at and not isinstance(self._jsonl, _FullDisk):
        self._jsonl = _FullDisk(self._jsonl)
      super().write(step, scalars)

  from copd_jax.rl import methods
  cfg = micro_runs.experts_config(tmp_path, steps=3)
  cfg.checkpoint.every_steps = 1
  s, params = micro_base
  writer = DiskFillsAtStep(cfg.workdir)
  with pytest.raises(train_checkpoint.StorageError) as caught:
    methods.run_rl_method(spec_of(cfg), s, params, writer)
  writer.close()
  message = str(caught.value)
  assert "metrics.jsonl" in message and "No space left" in message
  newest = os.path.join(cfg.workdir, "checkpoints", "experts", "1")
  assert f"Newest complete checkpoint: {os.path.abspath(newest)}" in message
  assert os.path.isdir(newest)


def test_sigterm_ends_a_stuck_process_in_bounded_time():
  """The run is stuck in a write that never returns (the old tensorboardX hang): SIGTERM
  must still end the process once the grace period is over."""
  code = textwrap.dedent("""
      import queue
      from copd_jax import train_checkpoint
      with train_checkpoint.stop_on_signals(True, grace_s=1.0):
        print("ready", flush=True)
        q = queue.Queue(maxsize=1)
        q.put(1)
        q.put(2)  # blocks forever
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)
  assert proc.stdout.readline().strip() == "ready"
  proc.send_signal(signal.SIGTERM)
  try:
    _, err = proc.communicate(timeout=600)  # ends after 1 s; generous under load
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("SIGTERM did not end the process")
  assert proc.returncode == 128 + signal.SIGTERM
  assert "did not reach a step boundary within 1 s" in err


def test_second_sigterm_ends_the_process_at_once():
  code = textwrap.dedent("""
      import os, signal, time
      from copd_jax import train_checkpoint
      with train_checkpoint.stop_on_signals(True, grace_s=3600.0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        print("flagged", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3600)
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, cwd=REPO)  # ends at once; generous under load
  assert out.stdout.strip() == "flagged" and out.returncode == 128 + signal.SIGTERM
  assert "second signal" in out.stderr
