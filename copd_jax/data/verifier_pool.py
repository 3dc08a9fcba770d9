"""A bounded pool of verifier worker processes with hard time and memory limits.

Bounds (each checked by tests/data/test_verifier_pool.py):
  * at most `workers` processes, which may not exceed the CPUs this process may use
    (cpu_cap), and never more than a batch has requests;
  * a worker dies with its parent from its first statements on, also when the parent is
    SIGKILLed while the worker is still starting (see _BOOTSTRAP);
  * a worker's address space is limited to `memory_mb` (RLIMIT_AS): one that runs out
    exits, its answer scores 0, and it is replaced and counted (PoolStats.memory_exceeded);
  * a request over its time limit kills its worker (the answer scores 0).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence


def cpu_cap() -> int:
  """The CPUs this process may run on: the most worker processes a pool may have."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


# A worker whose allocation fails (its address space is limited by RLIMIT_AS, so Python
# raises MemoryError) exits with this code.
EXIT_OUT_OF_MEMORY = 86
# What dlopen / mmap failures under the address-space limit say.
_MEMORY_MESSAGES = ("failed to map segment", "Cannot allocate memory")


# A worker is a fresh interpreter running this script: never a fork of the parent (which
# runs JAX), and not multiprocessing's spawn, which re-imports the parent's __main__
# module -- JAX and all -- before any code of ours runs. Its first statements, before any
# heavy import: die with the parent (prctl PR_SET_PDEATHSIG: the kernel sends SIGKILL
# when the parent ends, by SIGKILL too), exit if the parent died before that (the parent
# id changed), ignore Ctrl-C (the parent handles it), and limit the address space.
# argv: parent pid, the socket's file descriptor, the memory limit in MiB, the entry point
# 'module:function' called as function(conn, parent_pid, *args) with the args the parent
# sends first (after sys.path).
_BOOTSTRAP = f"""
import os, signal, sys
parent = int(sys.argv[1])
try:
  import ctypes
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
except Exception:
  pass
if os.getppid() != parent:
  os._exit(0)
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
  import resource
  limit = int(sys.argv[3]) << 20
  hard = resource.getrlimit(resource.RLIMIT_AS)[1]
  if hard != resource.RLIM_INFINITY:
    limit = min(limit, hard)
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
except (ImportError, ValueError, OSError):
  pass
try:
  import importlib
  from multiprocessing.connection import Connection
  conn = Connection(int(sys.argv[2]))
  path, args = conn.recv()
  sys.path[:] = path
  module, _, function = sys.argv[4].partition(":")
  entry = getattr(importlib.import_module(module), function)
except Exception as e:  # a shared library that cannot be mapped raises ImportError
  if isinstance(e, MemoryError) or any(m in str(e) for m in {_MEMORY_MESSAGES!r}):
    os._exit({EXIT_OUT_OF_MEMORY})
  raise
entry(conn, parent, *args)
"""


def ran_out_of_memory(error: BaseException) -> bool:
  """Whether an exception inside a worker means its memory limit was hit: MemoryError,
  or an import whose shared library could not be mapped (ImportError)."""
  return isinstance(error, MemoryError) or any(m in str(error) for m in _MEMORY_MESSAGES)


# The math verifier's worker (math_verifier.worker_main; its args: (the plug-in specs it serves,)).
MATH_WORKER_ENTRY = "copd_jax.data.math_verifier:worker_main"


def watch_parent(parent_pid: int) -> None:
  """Inside a worker: a daemon thread that ends this process when its parent id changes
  (the parent ended). The fallback where prctl is unavailable (not Linux)."""
  def watch():
    while os.getppid() == parent_pid:
      time.sleep(0.5)
    os._exit(0)

  threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _worker_env() -> dict:
  """The worker's environment: the parent's, with one thread per math library. A worker
  uses one CPU, and every thread a BLAS pool starts reserves a stack in the address
  space that worker_memory_mb limits (hundreds on a large host)."""
  return dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
              MKL_NUM_THREADS="1")


@dataclasses.dataclass
class _Worker:
  process: Any  # subprocess.Popen
  conn: Any
  ready: bool = False
  started: float = 0.0
  job: int | None = None      # index of the request it is working on
  deadline: float = 0.0


@dataclasses.dataclass
class PoolStats:
  """What happened to one batch of requests (logged as verify/... per step)."""
  requests: int = 0
  timeouts: int = 0         # killed after the per-answer limit, or died (scored 0)
  over_budget: int = 0      # not finished when the step's budget ran out (scored 0)
  restarts: int = 0         # workers started to replace killed ones
  memory_exceeded: int = 0  # workers over their memory limit (scored 0, replaced)
  errors: int = 0           # responses whose reward plug-in failed (verifiers.score)
  # request index -> 'timeout' | 'memory' | 'over_budget' for the requests that failed
  failures: dict = dataclasses.field(default_factory=dict)


class VerifierPool:
  """Up to `workers` long-lived worker processes that answer requests in parallel, each
  under a hard time limit and an address-space limit of `memory_mb` MiB.

  entry: 'module:function' run in each worker as function(conn, parent_pid, *args)
  (default: the math verifier, args (plug-in specs,)); it sends 'ready', then answers
  each request it receives with one message, until the connection closes.

  `run` starts at most as many workers as the batch has requests, and hands requests to
  idle workers. A worker over its per-request time limit is killed (the request scores
  `failed`), and so is one that runs out of memory (it exits itself); a fresh one
  replaces it while requests are waiting. When the batch's budget (counted from when a
  worker is first ready) runs out, the requests still running or waiting score `failed`
  and the busy workers are killed. Thread-safe (one batch at a time). The kernel's
  parent-death signal follows the THREAD that started a worker: one started by a thread
  that has since ended is gone, and the next batch starts a fresh one."""

  STARTUP_TIMEOUT_S = 120.0

  def __init__(self, workers: int = 1, entry: str = MATH_WORKER_ENTRY, args: tuple = ((),),
               memory_mb: int = 2048, name: str = "verifier"):
    cap = cpu_cap()
    if not 1 <= workers <= cap:
      raise ValueError(f"a {name} pool has 1 to {cap} workers (the CPUs this process may "
                       f"use), got {workers}")
    self.size, self.entry, self.args = int(workers), entry, tuple(args)
    self.memory_mb, self.name = int(memory_mb), name
    self.memory_exceeded_total = 0
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()

  # ------------------------------------------------------------------ processes
  def _spawn(self) -> _Worker:
    parent_end, child_end = socket.socketpair()
    try:
      process = subprocess.Popen(
          [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), str(child_end.fileno()),
           str(self.memory_mb), self.entry],
          pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, env=_worker_env())
    except BaseException:
      parent_end.close()
      raise
    finally:
      child_end.close()
    conn = Connection(parent_end.detach())
    conn.send((list(sys.path), self.args))
    return _Worker(process, conn, started=time.monotonic())

  @staticmethod
  def _kill(worker: _Worker) -> None:
    worker.process.kill()
    worker.process.wait()
    worker.conn.close()

  @staticmethod
  def _exit_code(worker: _Worker) -> int | None:
    """The exit code of a worker whose connection closed (it is ending, or has ended)."""
    try:
      return worker.process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
      return None

  def pids(self) -> list[int]:
    return [w.process.pid for w in self._workers]

  def stop(self) -> None:
    with self._lock:
      for worker in self._workers:
        self._kill(worker)
      self._workers = []

  # ------------------------------------------------------------------- batches
  def run(self, requests: Sequence[tuple], timeout_s: float, budget_s: float = math.inf,
          failed=0.0) -> tuple[list, PoolStats]:
    """Answers of `requests` in order, and what happened.

    timeout_s: the limit per request (a request over it gets `failed`); budget_s: the
    limit for the whole batch (requests not done by then get `failed`)."""
    with self._lock:
      results, stats = self._run(list(requests), float(timeout_s), float(budget_s), failed)
    if stats.memory_exceeded:
      self.memory_exceeded_total += stats.memory_exceeded
      print(f"warning: {stats.memory_exceeded} {self.name} worker(s) ran out of their "
            f"{self.memory_mb} MiB (config.reward.worker_memory_mb): their answers scored 0 "
            f"and they were replaced ({self.memory_exceeded_total} in this process so far)",
            file=sys.stderr, flush=True)
    return results, stats

  def _startup_error(self, worker: _Worker) -> RuntimeError:
    code = self._exit_code(worker)
    if code == EXIT_OUT_OF_MEMORY:
      return RuntimeError(f"a {self.name} worker ran out of memory while starting: "
                          f"config.reward.worker_memory_mb={self.memory_mb} is too small")
    return RuntimeError(f"a {self.name} worker process died while starting (exit code "
                        f"{code}); worker arguments {self.args}")

  def _run(self, requests, timeout_s, budget_s, failed):
    stats = PoolStats(requests=len(requests))
    results = [failed] * len(requests)
    pending = collections.deque(range(len(requests)))
    # The budget runs from when a worker is first ready: starting workers (a fresh
    # interpreter and its imports, bounded by STARTUP_TIMEOUT_S) does not eat the
    # answers' time.
    end = math.inf
    self._workers = [w for w in self._workers if w.process.poll() is None or self._kill(w)]
    while len(self._workers) < min(self.size, len(requests)):  # no more than the work
      self._workers.append(self._spawn())
    while pending or any(w.job is not None for w in self._workers):
      now = time.monotonic()
      if end == math.inf and any(w.ready for w in self._workers):
        end = now + budget_s
      for w in self._workers:
        if w.ready and w.job is None and pending:
          w.job, w.deadline = pending.popleft(), now + timeout_s
          try:
            w.conn.send(requests[w.job])
          except OSError:
            w.deadline = now  # a dead worker: handled as a timeout below
      deadlines = [w.deadline if w.ready else w.started + self.STARTUP_TIMEOUT_S
                   for w in self._workers if w.job is not None or not w.ready]
      wait_s = min(max(0.0, min(deadlines + [end]) - now), 3600.0)
      ready = set(wait([w.conn for w in self._workers if w.job is not None or not w.ready],
                       timeout=wait_s))
      now = time.monotonic()
      for i, w in enumerate(self._workers):
        message = None
        if w.conn in ready:
          try:
            message = w.conn.recv()
          except (EOFError, OSError):
            message = None
        if message is not None and not w.ready:
          if message != "ready":
            raise RuntimeError(f"{self.name} worker sent {message!r} instead of 'ready'")
          w.ready = True
          continue
        if message is not None:
          results[w.job], w.job = message, None
          continue
        if not w.ready and w.conn in ready:
          raise self._startup_error(w)
        if not w.ready and now >= w.started + self.STARTUP_TIMEOUT_S:
          raise RuntimeError(f"a {self.name} worker process did not start within "
                             f"{self.STARTUP_TIMEOUT_S:.0f} s")
        died = w.conn in ready
        if died or (w.ready and w.job is not None and now >= w.deadline):
          # over its limit, out of memory, or died: score `failed`, replace it if needed
          if died and self._exit_code(w) == EXIT_OUT_OF_MEMORY:
            stats.memory_exceeded += 1
            stats.failures[w.job] = "memory"
          else:
            stats.timeouts += 1
            stats.failures[w.job] = "timeout"
          self._kill(w)
          self._workers[i] = self._spawn() if pending else None
          stats.restarts += self._workers[i] is not None
      self._workers = [w for w in self._workers if w is not None]
      if now >= end:
        stats.over_budget = len(pending)
        for j in pending:
          stats.failures[j] = "over_budget"
        for i, w in enumerate(self._workers):
          if w.job is not None:  # kill it; the next batch starts what it needs
            stats.over_budget += 1
            stats.failures[w.job] = "over_budget"
            self._kill(w)
            self._workers[i] = None
        self._workers = [w for w in self._workers if w is not None]
        break
    return results, stats
