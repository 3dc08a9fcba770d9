"""The math verifier: math-verify equivalence in worker processes with a hard time limit."""
from __future__ import annotations

import atexit
import collections
import dataclasses
import importlib
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Sequence

from copd_jax.data.answers import MAX_FINAL_ANSWER_CHARS, final_answer_text

DEFAULT_MATH_TIMEOUT_S = 5.0
DEFAULT_STEP_BUDGET_S = 300.0
DEFAULT_WORKERS = 2
# math-verify (sympy via latex2sympy2_extended) decides equivalence. What was checked in
# the installed sources (math-verify 0.9.0, latex2sympy2_extended 1.11.0, sympy 1.14):
# * math_verify's ExprExtractionConfig parses plain expressions with sympy.parse_expr,
#   i.e. Python eval: never used here -- only LatexExtractionConfig.
# * latex2sympy2_extended builds sympy objects from an ANTLR parse tree; its only path to
#   eval is sympy.Number(token) on lexer NUMBER tokens (digits and separators), which
#   sympify hands to parse_expr. (Its parse_expr of `variable_values` is never used by
#   math-verify.)
# * sympy imports many modules lazily, the first time simplify or a set/integral routine
#   needs them, and some of those parse their own constants at import time
#   (sympy.physics.units parses every unit prefix name: 'yotta', 'Y', ...).
# * math-verify's own time limit is signal.alarm, which works only in a main thread.
# So every comparison runs in a separate worker PROCESS (a pool of them, VerifierPool):
# the parent enforces the time limit by killing a worker (reward 0), from any thread; a
# worker dies with its parent; and inside a worker sympy's parse_expr is replaced, after
# warm-up, by a guard that accepts number literals, and the constants of a module being
# imported (never model text: no model text is in scope while a module executes its
# import). The warm-up imports sympy's lazily loaded modules and runs symbolic checks, so
# the guard normally sees nothing but numbers. The response is cut to its final answer
# (final_answer_text: bounded length) before it is sent.
_NUMBER_LITERAL_CHARS = frozenset("0123456789.")


# Modules sympy imports on first use (simplify, sets, integrals, units). Imported before
# the guard is installed, so the guard never stands between sympy and its own constants.
_LAZY_SYMPY_MODULES = (
    "sympy.physics.units", "sympy.physics.matrices", "sympy.combinatorics",
    "sympy.integrals.heurisch", "sympy.integrals.manualintegrate", "sympy.integrals.risch",
    "sympy.sets.handlers.issubset", "sympy.sets.setexpr", "sympy.tensor.tensor",
    "sympy.assumptions.wrapper")


# (reference, answer) pairs run once per worker before the guard: they take every
# comparison path (numbers, percentages, simplify, trig, sets, intervals, matrices,
# equations, integrals, sums) so that whatever else those paths import is loaded.
_WARM_UP_PAIRS = (
    ("10\\%", "0.1"), ("(x+1)^2", "x^2+2x+1"), ("1", "\\sin^2x+\\cos^2x"),
    ("\\{1,2\\}", "\\{2,1\\}"), ("(0,1]", "(0,1]"), ("x=3", "3"),
    ("\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1&2\\end{pmatrix}"),
    ("\\frac{1}{2}", "\\int_0^1 x\\,dx"), ("6", "\\sum_{i=1}^{3} i"), ("2\\sqrt{2}", "\\sqrt{8}"),
    ("3\\log 2", "\\log 8"), ("x<3", "x<3"), ("\\pi", "\\pi"), ("5", "5\\text{ cm}"))


def _is_number_literal(text) -> bool:
  return (isinstance(text, str) and 0 < len(text) <= 64
          and all(ch in _NUMBER_LITERAL_CHARS for ch in text) and text.count(".") <= 1
          and text != ".")


def _inside_module_import(frame) -> bool:
  """True when a module's top-level code is running somewhere up the stack."""
  while frame is not None:
    if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
      return True
    frame = frame.f_back
  return False


def _install_parse_expr_guard() -> None:
  """Inside the worker: sympy's parse_expr (Python eval) accepts number literals, and the
  constants of a module being imported; anything else raises ValueError."""
  import sys

  import latex2sympy2_extended.latex2sympy2 as l2s
  import math_verify.parser
  from sympy.parsing import sympy_parser

  original = sympy_parser.parse_expr

  def guarded_parse_expr(s, *args, **kwargs):
    if not _is_number_literal(s) and not _inside_module_import(sys._getframe(1)):
      raise ValueError(f"refusing to parse a non-numeric string with sympy ({len(s)} chars)")
    return original(s, *args, **kwargs)

  sympy_parser.parse_expr = guarded_parse_expr
  l2s.parse_expr = guarded_parse_expr
  math_verify.parser.parse_expr = guarded_parse_expr


def _latex_of_reference(answer: str) -> str:
  """A reference answer as text math-verify parses as LaTeX: '\\boxed{...}' as is,
  '$...$' as is, anything else wrapped in $...$."""
  answer = answer.strip()
  if "\\boxed" in answer or (answer.startswith("$") and answer.endswith("$")):
    return answer
  return f"${answer}$"


def _balanced_braces(text: str) -> bool:
  depth = 0
  for ch in text:
    depth += (ch == "{") - (ch == "}")
    if depth < 0:
      return False
  return depth == 0


@dataclasses.dataclass(frozen=True)
class RewardExample:
  """What a reward plug-in sees of an example (tasks.Example without its pixels)."""
  capability: str
  question: str
  answer: str
  solution: str = ""
  verifier: str = "integer"
  modality: str | None = None
  record: str = ""

  @classmethod
  def of(cls, example) -> "RewardExample":
    return cls(**{f.name: getattr(example, f.name, f.default)
                  for f in dataclasses.fields(cls)})


def load_plugin(spec: str):
  """'package.module:function' -> the callable (imported here; user code, not model
  output). ValueError naming the spec when it is malformed, missing or not callable."""
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"a reward plug-in is 'module:function', got {spec!r}")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:
    raise ValueError(f"reward plug-in {spec!r}: cannot import {module_name!r} "
                     f"({type(e).__name__}: {e})") from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ValueError(f"reward plug-in {spec!r}: {module_name!r} has no callable {attr!r}")
  return fn


def _die_with_parent(parent_pid: int) -> None:
  """Inside a worker: end this process when the parent ends, even if it was SIGKILLed.

  Linux: the kernel sends SIGKILL when the parent exits (prctl PR_SET_PDEATHSIG), which
  works even while this process is stuck in C code holding the GIL. Everywhere: a daemon
  thread that polls the parent id as a fallback."""
  if sys.platform.startswith("linux"):
    try:
      import ctypes
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
      pass
  if os.getppid() != parent_pid:  # the parent died before the line above ran
    os._exit(0)

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(0.5)
    os._exit(0)

  threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _worker_main(conn, parent_pid: int, plugin: str) -> None:
  """Worker process: answers requests (see VerifierPool) until its pipe closes.

  ('math', reference, final) -> 0.0 / 1.0;  ('reference', reference) -> bool, whether
  the reference parses;  ('plugin', response, RewardExample) -> the plug-in's float;
  ('late_imports',) -> modules imported after the guard (should stay empty)."""
  _die_with_parent(parent_pid)
  import logging
  logging.getLogger("math_verify").setLevel(logging.ERROR)
  import math_verify
  import math_verify.grader
  import math_verify.parser
  # Our parent enforces the time limit; math-verify's signal.alarm is switched off.
  math_verify.parser.TIMEOUT_WARNING_SHOWN = True
  math_verify.grader.TIMEOUT_WARNING_SHOWN = True
  config = [math_verify.LatexExtractionConfig(boxed_match_priority=0)]

  def parse(text):
    return math_verify.parse(text, extraction_config=config, parsing_timeout=None)

  def gold_of(reference):
    gold = gold_cache.get(reference)
    if gold is None:
      gold = gold_cache[reference] = parse(_latex_of_reference(reference))
      if len(gold_cache) > 4096:
        gold_cache.pop(next(iter(gold_cache)))
    return gold

  def equivalent(reference, final):
    gold = gold_of(reference)
    pred = parse(f"\\boxed{{{final}}}")
    return bool(gold and pred and math_verify.verify(gold, pred, timeout_seconds=None))

  gold_cache: dict = {}
  for name in _LAZY_SYMPY_MODULES:
    importlib.import_module(name)
  for reference, final in _WARM_UP_PAIRS:
    equivalent(reference, final)
  plugin_fn = load_plugin(plugin) if plugin else None  # its imports too, before the guard
  _install_parse_expr_guard()
  imported = set(sys.modules)
  conn.send("ready")
  while True:
    try:
      request = conn.recv()
    except (EOFError, OSError):
      return
    kind = request[0]
    try:
      if kind == "math":
        result = 1.0 if equivalent(*request[1:]) else 0.0
      elif kind == "reference":
        # parse() returns [sympy object, text] on success and [text] alone on failure
        result = any(not isinstance(g, str) for g in gold_of(request[1]))
      elif kind == "plugin":
        value = float(plugin_fn(*request[1:]))
        result = value if math.isfinite(value) else 0.0
      else:
        result = sorted(set(sys.modules) - imported)
    except Exception:  # any failure on model text is simply a wrong answer
      result = False if kind == "reference" else 0.0
    conn.send(result)


@dataclasses.dataclass
class _Worker:
  process: Any
  conn: Any
  ready: bool = False
  started: float = 0.0
  job: int | None = None      # index of the request it is working on
  deadline: float = 0.0


@dataclasses.dataclass
class PoolStats:
  """What happened to one batch of requests (logged as verify/... per step)."""
  requests: int = 0
  timeouts: int = 0       # killed after the per-answer limit (scored 0)
  over_budget: int = 0    # not finished when the step's budget ran out (scored 0)
  restarts: int = 0       # workers started to replace killed ones


class VerifierPool:
  """`workers` long-lived worker processes (spawned, never forked: the parent runs JAX)
  that answer verification requests in parallel, each under a hard time limit.

  `run` hands requests to idle workers; one that exceeds its per-request time limit is
  killed (the request scores 0) and a fresh worker starts in the background (spawn +
  importing sympy takes a second or two). When the batch's budget (counted from when a
  worker is first ready) runs out, the requests still running or waiting score 0 and the
  busy workers are replaced. Workers die with this process, even on SIGKILL.
  Thread-safe (one batch at a time)."""

  STARTUP_TIMEOUT_S = 120.0

  def __init__(self, workers: int = 1, plugin: str = ""):
    if workers < 1:
      raise ValueError(f"a verifier pool needs at least 1 worker, got {workers}")
    self.size, self.plugin = int(workers), plugin
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()

  # ------------------------------------------------------------------ processes
  def _spawn(self) -> _Worker:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs JAX
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_worker_main, args=(child, os.getpid(), self.plugin),
                          daemon=True, name="copd-verifier")
    process.start()
    child.close()
    return _Worker(process, parent, started=time.monotonic())

  @staticmethod
  def _kill(worker: _Worker) -> None:
    worker.process.kill()
    worker.process.join()
    worker.conn.close()

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
    """Answers of `requests` (see _worker_main) in order, and what happened.

    timeout_s: the limit per request (a request over it gets `failed`); budget_s: the
    limit for the whole batch (requests not done by then get `failed`)."""
    with self._lock:
      return self._run(list(requests), float(timeout_s), float(budget_s), failed)

  def _run(self, requests, timeout_s, budget_s, failed):
    from multiprocessing.connection import wait
    stats = PoolStats(requests=len(requests))
    results = [failed] * len(requests)
    pending = collections.deque(range(len(requests)))
    # The budget runs from when a worker is first ready: starting workers (spawn and
    # imports, bounded by STARTUP_TIMEOUT_S) does not eat the answers' time.
    end = math.inf
    self._workers = [w for w in self._workers if w.process.is_alive() or self._kill(w)]
    while len(self._workers) < self.size and pending:
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
            raise RuntimeError(f"verifier worker sent {message!r} instead of 'ready'")
          w.ready = True
          continue
        if message is not None:
          results[w.job], w.job = message, None
          continue
        timed_out = (w.ready and w.job is not None and now >= w.deadline) or w.conn in ready
        if not w.ready and not timed_out and now >= w.started + self.STARTUP_TIMEOUT_S:
          raise RuntimeError("a verifier worker process did not start within "
                             f"{self.STARTUP_TIMEOUT_S:.0f} s")
        if not w.ready and w.conn in ready:
          raise RuntimeError(f"a verifier worker process died while starting (exit code "
                             f"{w.process.exitcode}); plug-in {self.plugin or 'none'}")
        if timed_out:  # over its limit, or died: kill it, score 0, start a fresh one
          stats.timeouts += 1
          self._kill(w)
          self._workers[i] = self._spawn()
          stats.restarts += 1
      if now >= end:
        stats.over_budget = len(pending)
        for i, w in enumerate(self._workers):
          if w.job is not None:  # kill it; a fresh one starts while the caller goes on
            stats.over_budget += 1
            self._kill(w)
            self._workers[i] = self._spawn()
            stats.restarts += 1
        break
    return results, stats


def check_math_reference(answer: str) -> None:
  """Cheap form checks of a 'math' reference (see check_math_references for parsing)."""
  if not isinstance(answer, str) or not answer.strip():
    raise ValueError(f"a 'math' answer must be a non-empty string, got {answer!r}")
  if len(answer) > MAX_FINAL_ANSWER_CHARS:
    raise ValueError(f"a 'math' answer must have at most {MAX_FINAL_ANSWER_CHARS} "
                     f"characters, got {len(answer)}")
  if not _balanced_braces(answer):
    raise ValueError(f"a 'math' answer must have balanced braces, got {answer!r}")


def unparsable_math_references(answers: Sequence[str],
                               config: RewardConfig | None = None) -> list[int]:
  """Indices of the references math-verify cannot parse (or not within the time limit),
  i.e. those every response would score 0 against. Run when a dataset loads."""
  config = config or _active_config
  unique = sorted(set(answers))
  parsed, _ = shared_pool(config).run([("reference", a) for a in unique], config.timeout_s,
                                      failed=False)
  ok = dict(zip(unique, parsed))
  return [i for i, a in enumerate(answers) if not ok[a]]


def math_request(response, answer: str) -> tuple | None:
  """The worker request that scores `response` against a math reference, or None when
  the response has no usable final answer (it scores 0 without a worker)."""
  check_math_reference(answer)
  final = final_answer_text(response)
  if final is None or any(not ch.isprintable() for ch in final):
    return None
  return ("math", answer, final)


def math_equivalent(response, answer: str, timeout_s: float | None = None) -> float:
  """1.0 if the response's final answer (last \\boxed{...} or text after 'answer is' /
  'Answer:', see final_answer_text) is mathematically equivalent to `answer` according
  to math-verify ('0.5' ~ '\\frac{1}{2}', '(x+1)^2' ~ 'x^2+2x+1'); 0.0 otherwise, on any
  parse failure, and when the check takes longer than timeout_s seconds (default: the
  configured limit, RewardConfig.timeout_s)."""
  request = math_request(response, answer)
  if request is None:
    return 0.0
  config = _active_config
  results, _ = shared_pool(config).run([request], timeout_s or config.timeout_s)
  return float(results[0])


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """How rewards are computed (config.reward).

  fn: '' = the built-in verifier each example names; 'module:function' = a plug-in
    called as fn(response: str, example: RewardExample) -> float for every example, in
    the sandboxed worker processes with the same time limit (a plug-in cannot use
    sympy's parse_expr there: the guard refuses it).
  timeout_s: the limit per answer (math equivalence or plug-in call); over it scores 0.
  step_budget_s: the limit for one batch (a training step's or an eval batch's
    answers); answers not scored by then score 0.
  workers: worker processes verifying in parallel.
  """
  fn: str = ""
  timeout_s: float = DEFAULT_MATH_TIMEOUT_S
  step_budget_s: float = DEFAULT_STEP_BUDGET_S
  workers: int = DEFAULT_WORKERS

  def __post_init__(self):
    if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s < math.inf):
      raise ValueError(f"timeout_s must be a positive finite number of seconds, got "
                       f"{self.timeout_s!r}")
    if not (isinstance(self.step_budget_s, (int, float)) and 0 < self.step_budget_s < math.inf):
      raise ValueError(f"step_budget_s must be a positive finite number of seconds, got "
                       f"{self.step_budget_s!r}")
    if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
      raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")
    if not isinstance(self.fn, str):
      raise ValueError(f"fn must be '' or 'module:function', got {self.fn!r}")


_active_config = RewardConfig()


_pool: VerifierPool | None = None
_pools: dict = {}  # (workers, plug-in) -> its pool


def configure(config: RewardConfig) -> None:
  """Sets the reward settings every later call uses (main sets config.reward)."""
  global _active_config
  if config.fn:
    load_plugin(config.fn)  # fail now, naming the spec, not in a worker later
  _active_config = config


def active_config() -> RewardConfig:
  return _active_config


def shared_pool(config: RewardConfig | None = None) -> VerifierPool:
  """The process's verifier pool for `config` (rebuilt when workers or plug-in change)."""
  global _pool
  config = config or _active_config
  if _pool is None or (_pool.size, _pool.plugin) != (config.workers, config.fn):
    # Several reward functions (copd_jax/data/reward_fns.py) take turns every step: each
    # keeps its own pool rather than restarting one pool per function per step.
    if _pool is None and not _pools:
      atexit.register(lambda: [p.stop() for p in _pools.values()])
    key = (config.workers, config.fn)
    for stale in [k for k in _pools if k[0] != config.workers]:
      _pools.pop(stale).stop()
    if key not in _pools:
      _pools[key] = VerifierPool(config.workers, config.fn)
    _pool = _pools[key]
  return _pool
