"""Child processes of the tests that run JAX on several simulated devices in another
process (a Qwen3-VL run on an expert mesh, two gloo processes): one such test at a time,
each child within a time budget, and a child that overruns it says where it stood.

- `multi_device_slot()`: an exclusive lock (fcntl.flock) shared by every test that starts
  multi-device children, across the pytest-xdist workers of one run. Two of them at once
  put 12+ device threads and two XLA compilers on 2 cores and doubled the memory peak.
- `python_module(...)`, `python_code(...)`: command lines of a child that prints every
  thread's Python stack when it receives SIGUSR1 (faulthandler).
- `finish(proc, budget_s)`: waits for the child. Past the budget it collects the child's
  Python stacks (SIGUSR1) and, where gdb is installed, its native thread stacks (the XLA
  runtime's threads: a rendezvous or a thread-pool wait shows there, not in Python),
  kills it and fails the test with the log's last lines and those stacks.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

# Set by tests/conftest.py in the pytest controller (inherited by the workers): one
# directory per test run. A process run without it (a test file run by hand) uses a
# per-user directory, still shared by every process that runs these tests at once.
SHARED_DIR_ENV = "COPD_TESTS_SHARED_DIR"

_DUMP_SIGNAL = signal.SIGUSR1
_PRELUDE = ("import faulthandler, signal, sys; "
            f"faulthandler.register(signal.Signals({int(_DUMP_SIGNAL)}), all_threads=True)")


def _shared_dir() -> str:
  path = os.environ.get(SHARED_DIR_ENV) or os.path.join(
      tempfile.gettempdir(), f"copd-jax-tests-{os.getuid()}")
  os.makedirs(path, exist_ok=True)
  return path


@contextlib.contextmanager
def multi_device_slot():
  """Holds the run's multi-device lock for the `with` body (blocks while another test
  holds it). Returns the seconds spent waiting."""
  start = time.monotonic()
  with open(os.path.join(_shared_dir(), "multi_device.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield time.monotonic() - start
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def python_module(module: str, *args: str) -> list[str]:
  """`python -m module args...`, with the SIGUSR1 stack dump installed first."""
  code = (f"{_PRELUDE}; import runpy; del sys.argv[0]; "
          "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
  return [sys.executable, "-c", code, module, *args]


def python_code(code: str, *args: str) -> list[str]:
  """`python -c code args...`, with the SIGUSR1 stack dump installed first."""
  return [sys.executable, "-c", f"{_PRELUDE}\n{code}", *args]


def start(command: list[str], **popen_kwargs) -> subprocess.Popen:
  """Popen with stdout and stderr together in one text pipe (what finish() reads)."""
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **popen_kwargs)


def native_stacks(pid: int, timeout_s: float = 120.0) -> str:
  """The threads of process pid grouped by their innermost frames (gdb), or why not."""
  gdb = shutil.which("gdb")
  if gdb is None:
    return "(gdb is not installed: no native stacks)"
  try:
    out = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-ex", "set pagination off",
                          "-ex", "thread apply all bt 12"], capture_output=True, text=True,
                         timeout=timeout_s).stdout
  except subprocess.TimeoutExpired:
    return f"(gdb did not answer within {timeout_s:.0f} s)"
  return summarize_native_stacks(out)


def summarize_native_stacks(gdb_output: str, frames: int = 6) -> str:
  """gdb's `thread apply all bt` as 'N threads: f0 < f1 < ...' lines, most common first."""
  stacks, current = [], None
  for line in gdb_output.splitlines():
    if line.startswith("Thread "):
      current = []
      stacks.append(current)
    elif current is not None and line.startswith("#"):
      match = re.search(r"\bin (.+?) \(", line) or re.search(r"^#\d+\s+(\S+) \(", line)
      if match and len(current) < frames:
        current.append(re.sub(r"<.*>|\(.*\)", "", match.group(1))[:90])
  counts = collections.Counter(" < ".join(s) for s in stacks if s)
  if not counts:
    return "(no native stacks)\n" + gdb_output[-2000:]
  return "\n".join(f"{n} thread(s): {stack}" for stack, n in counts.most_common())


def finish(procs, budget_s: float, what: str = "child") -> list[str]:
  """The outputs of the children procs (a Popen or a list of them, started by start())
  once all exit 0 within budget_s together. Otherwise fails the test naming where each
  child still running stood (its last log lines, Python and native stacks), after killing
  them all."""
  procs = [procs] if isinstance(procs, subprocess.Popen) else list(procs)
  deadline = time.monotonic() + budget_s
  outs = []
  try:
    for proc in procs:
      try:
        outs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0])
      except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: still running after its {budget_s:.0f} s budget; killed.\n"
                    + "\n".join(_stall_report(p) for p in procs if p.poll() is None),
                    pytrace=False)
  finally:
    kill_all(procs)
  failed = [f"--- pid {proc.pid} exited {proc.returncode}:\n{out[-4000:]}"
            for proc, out in zip(procs, outs) if proc.returncode != 0]
  assert not failed, f"{what}: {len(failed)} of {len(procs)} exited non-zero\n" + "\n".join(failed)
  return outs


def _stall_report(proc: subprocess.Popen) -> str:
  """Native stacks (gdb), then Python stacks (SIGUSR1), then kill: the child's report."""
  native = native_stacks(proc.pid)
  proc.send_signal(_DUMP_SIGNAL)  # faulthandler writes every thread's stack to the pipe
  time.sleep(2.0)
  proc.kill()
  out, _ = proc.communicate()  # everything it wrote, the dump included
  return (f"--- pid {proc.pid}: its output (last lines, then the Python stacks):\n"
          f"{(out or '')[-6000:]}\n--- pid {proc.pid}: native threads:\n{native[:6000]}")


def kill_all(procs) -> None:
  """SIGKILLs every child still running (a test that fails leaves nothing behind)."""
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
