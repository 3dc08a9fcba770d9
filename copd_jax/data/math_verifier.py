"""The math verifier: math-verify equivalence in worker processes with a hard time limit."""
from __future__ import annotations

import atexit
import dataclasses
import importlib
import math
import os
import sys
import traceback
from typing import Sequence

from copd_jax.data.answers import MAX_FINAL_ANSWER_CHARS, final_answer_text
from copd_jax.data.reward_values import (
  DEFAULT_MAX_ERROR_FRACTION,
  check_reward_value,
  failure_of,
)
from copd_jax.data.verifier_pool import (  # noqa: F401  (PoolStats, cpu_cap: re-exported)
  EXIT_OUT_OF_MEMORY,
  MATH_WORKER_ENTRY,
  PoolStats,
  VerifierPool,
  cpu_cap,
  ran_out_of_memory,
  watch_parent,
)

DEFAULT_MATH_TIMEOUT_S = 5.0
DEFAULT_STEP_BUDGET_S = 300.0
DEFAULT_WORKERS = 2
DEFAULT_WORKER_MEMORY_MB = 2048
# Below this a worker cannot even import sympy and math-verify.
MIN_WORKER_MEMORY_MB = 256
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
# So every comparison runs in a separate worker PROCESS (a pool of them, VerifierPool in
# verifier_pool.py): the parent enforces the time limit by killing a worker (reward 0),
# from any thread; a worker dies with its parent and has a memory limit; and inside a
# worker sympy's parse_expr is replaced, after warm-up, by a guard that accepts number literals, and the constants of a module being
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


# The load check of a math reference compares it with this answer: a wrong answer, as
# most responses are, so a reference against which comparisons hang (9^{9^{9^{9}}}: sympy
# tries to evaluate the power) is found when the dataset loads.
_PROBE_ANSWER = "0"


def _with_imaginary_unit(parsed: list) -> list:
  """math-verify reads a lone 'i' as a variable: the same parse with every free symbol
  named 'i' replaced by sympy's imaginary unit (so e^{i\\pi} = -1), or `parsed` itself
  when it has none."""
  import sympy
  out, changed = [], False
  for item in parsed:
    if isinstance(item, sympy.Basic):
      unit = {s: sympy.I for s in item.free_symbols if getattr(s, "name", None) == "i"}
      if unit:
        item, changed = item.xreplace(unit), True
    out.append(item)
  return out if changed else parsed


def worker_main(conn, parent_pid: int, plugins: tuple[str, ...] | str) -> None:
  """Worker process (verifier_pool starts it): answers requests until its pipe closes.

  ('math', reference, final) -> 0.0 / 1.0;  ('reference', reference) -> 'ok', or
  'unparsable' when math-verify cannot parse it (its comparison with a wrong answer must
  also finish within the time limit, or the pool reports a timeout);  ('plugin', spec,
  response, RewardExample) -> that plug-in's float (one of `plugins`, all imported at
  start), or a RewardFailure when it raised or returned a bad value (check_reward_value);  ('late_imports',) -> modules imported after
  the guard (should stay empty). A MemoryError that reaches this loop ends the process
  with EXIT_OUT_OF_MEMORY."""
  try:
    _serve(conn, parent_pid, (plugins,) if isinstance(plugins, str) else tuple(plugins))
  except Exception as e:
    if ran_out_of_memory(e):
      os._exit(EXIT_OUT_OF_MEMORY)
    raise


def _serve(conn, parent_pid: int, plugins: tuple[str, ...]) -> None:
  watch_parent(parent_pid)
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

  def verify(gold, pred):
    return bool(gold and pred and math_verify.verify(gold, pred, timeout_seconds=None))

  def equivalent(reference, final):
    gold, pred = gold_of(reference), parse(f"\\boxed{{{final}}}")
    if verify(gold, pred):
      return True
    gold_i, pred_i = _with_imaginary_unit(gold), _with_imaginary_unit(pred)
    return (gold_i is not gold or pred_i is not pred) and verify(gold_i, pred_i)

  def check_reference(reference):
    # parse() returns [sympy object, text] on success and [text] alone on failure
    if not any(not isinstance(g, str) for g in gold_of(reference)):
      return "unparsable"
    if not _is_number_literal(reference.strip().lstrip("-")):  # a plain number cannot hang
      equivalent(reference, _PROBE_ANSWER)  # must finish within the time limit
    return "ok"

  gold_cache: dict = {}
  for name in _LAZY_SYMPY_MODULES:
    importlib.import_module(name)
  for reference, final in _WARM_UP_PAIRS:
    equivalent(reference, final)
  # every plug-in's imports too, before the guard
  plugin_fns = {spec: load_plugin(spec) for spec in plugins if spec}
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
        result = check_reference(request[1])
      elif kind == "plugin":
        spec = request[1]
        try:
          result = check_reward_value(plugin_fns[spec](*request[2:]), spec)
        except MemoryError:
          raise
        except Exception as e:  # user code: a failure is reported, counted, not hidden
          result = failure_of(e, spec, traceback.format_exc(limit=20))
      else:
        result = sorted(set(sys.modules) - imported)
    except MemoryError:
      raise
    except Exception:  # any failure on model text is simply a wrong answer
      result = "unparsable" if kind == "reference" else 0.0
    conn.send(result)


def check_math_reference(answer: str) -> None:
  """Cheap form checks of a 'math' reference (see check_math_references for parsing)."""
  if not isinstance(answer, str) or not answer.strip():
    raise ValueError(f"a 'math' answer must be a non-empty string, got {answer!r}")
  if len(answer) > MAX_FINAL_ANSWER_CHARS:
    raise ValueError(f"a 'math' answer must have at most {MAX_FINAL_ANSWER_CHARS} "
                     f"characters, got {len(answer)}")
  if not _balanced_braces(answer):
    raise ValueError(f"a 'math' answer must have balanced braces, got {answer!r}")


def uncheckable_math_references(answers: Sequence[str], config: RewardConfig | None = None
                                ) -> list[tuple[int, str]]:
  """(index, why) of the references every response would score 0 against: those
  math-verify cannot parse, and those whose comparison with a wrong answer does not
  finish within config.timeout_s (9^{9^{9^{9}}}) or config.worker_memory_mb. Run when a
  dataset loads. config: the run's reward settings (default: RewardConfig())."""
  config = config or RewardConfig()
  unique = sorted(set(answers))
  outcome, stats = shared_pool(config).run([("reference", a) for a in unique],
                                           config.timeout_s, failed="failed")
  why = {"unparsable": "does not parse as a math expression (math-verify)",
         "timeout": f"cannot be checked within config.reward.timeout_s={config.timeout_s:g} s "
                    "(comparing it with a wrong answer did not finish)",
         "memory": "cannot be checked within config.reward.worker_memory_mb="
                   f"{config.worker_memory_mb} (its comparison ran out of memory)"}
  reasons = {}
  for j, (answer, result) in enumerate(zip(unique, outcome)):
    key = stats.failures.get(j, result)
    reasons[answer] = None if key == "ok" else why.get(key, f"cannot be checked ({key})")
  return [(i, reasons[a]) for i, a in enumerate(answers) if reasons[a] is not None]


def math_request(response, answer: str) -> tuple | None:
  """The worker request that scores `response` against a math reference, or None when
  the response has no usable final answer (it scores 0 without a worker)."""
  check_math_reference(answer)
  final = final_answer_text(response)
  if final is None or any(not ch.isprintable() for ch in final):
    return None
  return ("math", answer, final)


def math_equivalent(response, answer: str, timeout_s: float | None = None,
                    config: RewardConfig | None = None) -> float:
  """1.0 if the response's final answer (last \\boxed{...} or text after 'answer is' /
  'Answer:', see final_answer_text) is mathematically equivalent to `answer` according
  to math-verify ('0.5' ~ '\\frac{1}{2}', '(x+1)^2' ~ 'x^2+2x+1'); 0.0 otherwise, on any
  parse failure, and when the check takes longer than timeout_s seconds (default:
  config.timeout_s; config default: RewardConfig())."""
  request = math_request(response, answer)
  if request is None:
    return 0.0
  config = config or RewardConfig()
  results, _ = shared_pool(config).run([request], timeout_s or config.timeout_s)
  return float(results[0])


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """How rewards are computed (config.reward).

  fn: '' = the built-in verifier each example names; 'module:function' = a plug-in
    called as fn(response: str, example: RewardExample) -> float for every example, in
    the sandboxed worker processes with the same time limit (a plug-in cannot use
    sympy's parse_expr there: the guard refuses it).
  plugins: every plug-in this process scores with (config.reward.fns): the workers
    import them all at start, so one pool of `workers` processes serves every reward
    function (fn is added to them when missing).
  timeout_s: the limit per answer (math equivalence or plug-in call); over it scores 0.
  step_budget_s: the limit for one batch (a training step's or an eval batch's
    answers); answers not scored by then score 0.
  workers: worker processes verifying in parallel, at most the CPUs this process may
    use (verifier_pool.cpu_cap); a batch starts no more than it has answers.
  worker_memory_mb: each worker's address-space limit (MiB); a worker over it scores 0
    for that answer and is replaced (counted as verify/memory_exceeded).
  max_error_fraction: a plug-in that raises, or returns NaN, an infinity, a value beyond
    float32 or a non-number, fails that response (scored 0, counted as reward/errors);
    when failures reach this fraction of a batch's responses the run stops with
    RewardFunctionError (1.0: all of them; 0.0: any).
  """
  fn: str = ""
  plugins: tuple[str, ...] = ()
  timeout_s: float = DEFAULT_MATH_TIMEOUT_S
  step_budget_s: float = DEFAULT_STEP_BUDGET_S
  workers: int = DEFAULT_WORKERS
  worker_memory_mb: int = DEFAULT_WORKER_MEMORY_MB
  max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION

  def __post_init__(self):
    if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s < math.inf):
      raise ValueError(f"timeout_s must be a positive finite number of seconds, got "
                       f"{self.timeout_s!r}")
    if not (isinstance(self.step_budget_s, (int, float)) and 0 < self.step_budget_s < math.inf):
      raise ValueError(f"step_budget_s must be a positive finite number of seconds, got "
                       f"{self.step_budget_s!r}")
    if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
      raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")
    if self.workers > cpu_cap():
      raise ValueError(f"config.reward.workers must be at most {cpu_cap()} (the CPUs this "
                       f"process may use), got {self.workers}")
    if (isinstance(self.worker_memory_mb, bool) or not isinstance(self.worker_memory_mb, int)
        or self.worker_memory_mb < MIN_WORKER_MEMORY_MB):
      raise ValueError(f"worker_memory_mb must be an integer >= {MIN_WORKER_MEMORY_MB} (MiB), "
                       f"got {self.worker_memory_mb!r}")
    if not (isinstance(self.max_error_fraction, (int, float))
            and 0 <= self.max_error_fraction <= 1):
      raise ValueError(f"max_error_fraction must be a fraction in [0, 1], got "
                       f"{self.max_error_fraction!r}")
    if not isinstance(self.fn, str):
      raise ValueError(f"fn must be '' or 'module:function', got {self.fn!r}")
    if not (isinstance(self.plugins, tuple) and all(isinstance(p, str) and p
                                                   for p in self.plugins)):
      raise ValueError(f"plugins must be a tuple of 'module:function' specs, got "
                       f"{self.plugins!r}")


_pool: VerifierPool | None = None


def _stop_pool() -> None:
  if _pool is not None:
    _pool.stop()


atexit.register(_stop_pool)


def pool_plugins(config: RewardConfig) -> tuple[str, ...]:
  """The plug-ins a pool for `config` loads: config.plugins and config.fn, sorted."""
  return tuple(sorted(set(config.plugins) | ({config.fn} if config.fn else set())))


def shared_pool(config: RewardConfig) -> VerifierPool:
  """The process's one verifier pool: at most config.workers processes, whatever the
  number of reward functions (each worker serves every plug-in of pool_plugins). It is
  rebuilt, the old workers stopped, when the workers, their memory limit or the
  plug-ins change. The pool is a process resource (worker processes), not a setting:
  every caller passes the settings it scores with."""
  global _pool
  key = (config.workers, pool_plugins(config), config.worker_memory_mb)
  if _pool is None or (_pool.size, _pool.args[0], _pool.memory_mb) != key:
    _stop_pool()
    _pool = VerifierPool(config.workers, MATH_WORKER_ENTRY, args=(key[1],),
                         memory_mb=config.worker_memory_mb)
  return _pool

