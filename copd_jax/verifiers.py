"""Verifiable rewards: find the final answer in a response and compare it with the reference.

Four verifiers (`VERIFIERS`), named per example (tasks.Example.verifier):
  integer  the toy suite's: the integer after the last '#' marker, compared exactly.
  math     math-verify equivalence of the last \\boxed{...} (or the text after 'answer is')
           with the reference, in a worker process with a hard time limit.
  choice   the final multiple-choice letter A-J ('(B)', 'Answer: B', '**B**').
  exact    normalised (case, whitespace) exact match of the final answer.

Responses are model output, so anything may arrive: every reward function here returns a
value (never raises) on any response and does bounded work however long it is -- only a
fixed-size tail is read (`MAX_TAIL_CHARS` for integer, `MAX_FINAL_TAIL_CHARS` otherwise),
no regular expressions run on model text in this process, no unbounded digit string is
converted to int, and model text never reaches eval/exec (see the math section for what
was checked in math-verify and sympy). A malformed *reference* answer is a data bug and
raises ValueError.
"""
from __future__ import annotations

import atexit
import multiprocessing
import threading
from typing import Sequence

import numpy as np

ANSWER_MARKER = "#"
MAX_ANSWER_DIGITS = 6
# Only this suffix of a response is examined: an answer written after the marker fits
# easily, and the cost per response stays constant on adversarial (e.g. 1 MB) output.
MAX_TAIL_CHARS = 64
_ASCII_DIGITS = frozenset("0123456789")


def canonical_integer(text: str) -> str | None:
  """'+007' -> '7', '-0' -> '0', '-12' -> '-12'; None unless an optional sign then
  1..MAX_ANSWER_DIGITS ASCII digits (other Unicode digits, spaces, dots are rejected)."""
  if not isinstance(text, str):
    return None
  sign = ""
  if text[:1] in ("+", "-"):
    sign, text = text[0], text[1:]
  if not 1 <= len(text) <= MAX_ANSWER_DIGITS or not all(ch in _ASCII_DIGITS for ch in text):
    return None
  digits = text.lstrip("0") or "0"
  return "-" + digits if sign == "-" and digits != "0" else digits


def extract_answer(response: str) -> str | None:
  """The canonical integer after the LAST answer marker, or None.

  The text after the marker, with surrounding whitespace stripped, must be a whole
  integer (see canonical_integer): '3+4=7;7*2=14#14' -> '14', '#14.' -> None. The
  marker must lie within the last MAX_TAIL_CHARS characters of the response.
  """
  if not isinstance(response, str):
    return None
  tail = response[-MAX_TAIL_CHARS:]
  cut = tail.rfind(ANSWER_MARKER)
  if cut < 0:
    return None
  return canonical_integer(tail[cut + len(ANSWER_MARKER):].strip())


def reward(response: str, answer: str) -> float:
  """1.0 if the response's final answer equals `answer` as an integer, else 0.0.

  `answer` is the task's reference (not model output); a malformed one is a data bug
  and raises ValueError.
  """
  expected = canonical_integer(answer)
  if expected is None:
    raise ValueError(f"answer must be an integer string of at most {MAX_ANSWER_DIGITS} "
                     f"digits, got {answer!r}")
  return 1.0 if extract_answer(response) == expected else 0.0


def batch_rewards(responses: Sequence[str], answers: Sequence[str]) -> np.ndarray:
  """responses, answers: N each -> float32[N] of 0/1 rewards."""
  if len(responses) != len(answers):
    raise ValueError(f"responses and answers must have the same length, got "
                     f"{len(responses)} responses and {len(answers)} answers")
  return np.array([reward(r, a) for r, a in zip(responses, answers)], dtype=np.float32)


# ============================================================================ record verifiers
# Record datasets (copd_jax/datasets.py) name a verifier per example. Every verifier below
# keeps the guarantees above: a float for any response, never an exception, bounded work
# (only a fixed-size tail of the response is read), and model text never reaches eval/exec.

VERIFIERS = ("integer", "math", "choice", "exact")
CHOICE_LETTERS = "ABCDEFGHIJ"
# The final answer must lie in this suffix of a response (a boxed answer or an answer
# phrase at the end of a long chain of thought fits easily).
MAX_FINAL_TAIL_CHARS = 4096
# A final answer longer than this is not an answer; longer reference answers are rejected
# when a dataset is loaded.
MAX_FINAL_ANSWER_CHARS = 256
DEFAULT_MATH_TIMEOUT_S = 5.0
_BOXED = ("\\boxed{", "\\fbox{")
_ANSWER_PHRASES = ("final answer is", "final answer:", "answer is", "answer:")


def _matching_brace_end(text: str, open_index: int) -> int | None:
  """Index just past the '}' closing the '{' at open_index, or None (bounded by len)."""
  depth = 0
  for i in range(open_index, len(text)):
    ch = text[i]
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth == 0:
        return i + 1
  return None


def last_boxed(text: str) -> str | None:
  """Contents of the last \\boxed{...} (or \\fbox{...}) with balanced braces, or None."""
  best = -1
  for opener in _BOXED:
    best = max(best, text.rfind(opener))
  if best < 0:
    return None
  brace = text.index("{", best)
  end = _matching_brace_end(text, brace)
  return None if end is None else text[brace + 1:end - 1]


def _after_answer_phrase(text: str) -> str | None:
  """The text after the last answer phrase ('The final answer is', 'Answer:'), or None."""
  lowered = text.lower()
  cut, phrase = max((lowered.rfind(p), p) for p in _ANSWER_PHRASES)
  if cut < 0:
    return None
  return text[cut + len(phrase):]


def final_answer_text(response) -> str | None:
  """The model's final answer: the last \\boxed{...}, else the text after the last answer
  phrase ('answer is', 'Answer:'), else None. Looks only at the last MAX_FINAL_TAIL_CHARS
  characters; returns None for non-strings and for answers over MAX_FINAL_ANSWER_CHARS."""
  if not isinstance(response, str):
    return None
  tail = response[-MAX_FINAL_TAIL_CHARS:]
  answer = last_boxed(tail)
  if answer is None:
    answer = _after_answer_phrase(tail)
  if answer is None:
    return None
  answer = answer.strip()
  if not answer or len(answer) > MAX_FINAL_ANSWER_CHARS:
    return None
  return answer


# ------------------------------------------------------------------------------- exact

def normalise_text(text: str) -> str:
  """Case-folded, whitespace collapsed, surrounding whitespace and a final '.' removed."""
  text = " ".join(text.split()).casefold()
  return text[:-1].rstrip() if text.endswith(".") else text


def exact_reward(response, answer: str) -> float:
  """1.0 iff the final answer (see final_answer_text; else the last non-empty line of
  the response tail) equals `answer` after normalise_text."""
  if not isinstance(response, str):
    return 0.0
  final = final_answer_text(response)
  if final is None:
    lines = [line for line in response[-MAX_FINAL_ANSWER_CHARS:].splitlines() if line.strip()]
    final = lines[-1] if lines else ""
  return 1.0 if normalise_text(final) == normalise_text(answer) else 0.0


# ------------------------------------------------------------------------------ choice

def _standalone_letters(text: str) -> list[str]:
  """Choice letters A-J that stand alone: not part of a longer word ('(B)', '**C**', 'D.')."""
  found = []
  for i, ch in enumerate(text):
    if ch in CHOICE_LETTERS:
      before = text[i - 1] if i > 0 else " "
      after = text[i + 1] if i + 1 < len(text) else " "
      if not before.isalnum() and not after.isalnum():
        found.append(ch)
  return found


def extract_choice(response) -> str | None:
  """The final chosen letter A-J, or None.

  In order: the content of the last \\boxed{...}; else the first standalone capital
  A-J after the last answer phrase ('Answer: B', 'The answer is (C)', 'answer: **D**');
  else the last standalone capital A-J on the last non-empty line ('(B)', '**B**', 'B').
  Only the last MAX_FINAL_TAIL_CHARS characters are read.
  """
  if not isinstance(response, str):
    return None
  tail = response[-MAX_FINAL_TAIL_CHARS:]
  boxed = last_boxed(tail)
  if boxed is not None:
    letters = _standalone_letters(boxed.replace("\\text{", " ").strip())
    return letters[0] if len(letters) == 1 else None
  after = _after_answer_phrase(tail)
  if after is not None:
    letters = _standalone_letters(after[:MAX_FINAL_ANSWER_CHARS])
    return letters[0] if letters else None
  lines = [line for line in tail.splitlines() if line.strip()]
  letters = _standalone_letters(lines[-1][-MAX_FINAL_ANSWER_CHARS:]) if lines else []
  return letters[-1] if letters else None


def canonical_choice(answer: str) -> str | None:
  """A reference choice 'B', '(B)', 'b' -> 'B'; None if it is not exactly one letter A-J."""
  if not isinstance(answer, str):
    return None
  core = answer.strip().strip("()*. ").upper()
  return core if len(core) == 1 and core in CHOICE_LETTERS else None


def choice_reward(response, answer: str) -> float:
  expected = canonical_choice(answer)
  if expected is None:
    raise ValueError(f"a 'choice' answer must be one letter A-J, got {answer!r}")
  return 1.0 if extract_choice(response) == expected else 0.0


# -------------------------------------------------------------------------------- math
# math-verify (sympy via latex2sympy2_extended) decides equivalence. What was checked in
# the installed sources (math-verify 0.9.0, latex2sympy2_extended 1.11.0, sympy 1.14):
# * math_verify's ExprExtractionConfig parses plain expressions with sympy.parse_expr,
#   i.e. Python eval: never used here -- only LatexExtractionConfig.
# * latex2sympy2_extended builds sympy objects from an ANTLR parse tree; its only path to
#   eval is sympy.Number(token) on lexer NUMBER tokens (digits and separators), which
#   sympify hands to parse_expr. (Its parse_expr of `variable_values` is never used by
#   math-verify.) sympy.physics.units also parses its own unit names once at import.
# * math-verify's own time limit is signal.alarm, which works only in a main thread.
# So the comparison runs in a separate worker PROCESS: the parent enforces the time limit
# by killing it (reward 0), from any thread; and inside the worker sympy's parse_expr is
# replaced, after warm-up, by a guard that accepts only number literals -- whatever a
# future version does, model text cannot reach eval. The response is cut to its final
# answer (final_answer_text: bounded length) before it is sent.

_NUMBER_LITERAL_CHARS = frozenset("0123456789.")


def _is_number_literal(text) -> bool:
  return (isinstance(text, str) and 0 < len(text) <= 64
          and all(ch in _NUMBER_LITERAL_CHARS for ch in text) and text.count(".") <= 1
          and text != ".")


def _install_parse_expr_guard() -> None:
  """Inside the worker: sympy's parse_expr (Python eval) accepts number literals only."""
  import latex2sympy2_extended.latex2sympy2 as l2s
  import math_verify.parser
  from sympy.parsing import sympy_parser

  original = sympy_parser.parse_expr

  def guarded_parse_expr(s, *args, **kwargs):
    if not _is_number_literal(s):
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


def _worker_main(conn) -> None:
  """Worker process: receives (reference, final answer) pairs, replies 0.0 / 1.0."""
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

  def equivalent(reference, final):
    gold = gold_cache.get(reference)
    if gold is None:
      gold = gold_cache[reference] = parse(_latex_of_reference(reference))
      if len(gold_cache) > 4096:
        gold_cache.pop(next(iter(gold_cache)))
    pred = parse(f"\\boxed{{{final}}}")
    return bool(gold and pred and math_verify.verify(gold, pred, timeout_seconds=None))

  gold_cache: dict = {}
  equivalent("10\\%", "0.1")  # warm-up: loads sympy.physics.units (which parses names)
  _install_parse_expr_guard()
  conn.send("ready")
  while True:
    try:
      reference, final = conn.recv()
    except EOFError:
      return
    try:
      result = 1.0 if equivalent(reference, final) else 0.0
    except Exception:  # any failure on model text is simply a wrong answer
      result = 0.0
    conn.send(result)


class MathWorker:
  """One long-lived worker process for math equivalence with a hard time limit per check.

  On a timeout the worker is killed (the check scores 0) and a fresh one starts on the
  next check; that restart (spawn + importing sympy) takes a second or two. Works from
  any thread: the time limit is the parent's wait, not a signal.
  """

  STARTUP_TIMEOUT_S = 120.0

  def __init__(self):
    self._process = None
    self._conn = None
    self._lock = threading.Lock()

  def _start(self) -> None:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs JAX
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_worker_main, args=(child,), daemon=True,
                          name="copd-math-verify")
    process.start()
    child.close()
    if not parent.poll(self.STARTUP_TIMEOUT_S) or parent.recv() != "ready":
      process.kill()
      raise RuntimeError("the math-verify worker process did not start")
    self._process, self._conn = process, parent

  def stop(self) -> None:
    if self._process is not None:
      self._process.kill()
      self._process.join()
      self._conn.close()
    self._process = self._conn = None

  def equivalent(self, reference: str, final: str, timeout_s: float) -> float:
    """1.0 if math-verify finds `final` equivalent to `reference` within timeout_s."""
    with self._lock:
      if self._process is None or not self._process.is_alive():
        self.stop()
        self._start()
      try:
        self._conn.send((reference, final))
        if self._conn.poll(timeout_s):
          return float(self._conn.recv())
      except (EOFError, OSError):
        pass
      self.stop()  # timed out or died: kill it; the next check starts a fresh one
      return 0.0


_math_worker: MathWorker | None = None


def _shared_math_worker() -> MathWorker:
  global _math_worker
  if _math_worker is None:
    _math_worker = MathWorker()
    atexit.register(_math_worker.stop)
  return _math_worker


def check_math_reference(answer: str) -> None:
  if not isinstance(answer, str) or not answer.strip():
    raise ValueError(f"a 'math' answer must be a non-empty string, got {answer!r}")
  if len(answer) > MAX_FINAL_ANSWER_CHARS:
    raise ValueError(f"a 'math' answer must have at most {MAX_FINAL_ANSWER_CHARS} "
                     f"characters, got {len(answer)}")


def math_equivalent(response, answer: str, timeout_s: float = DEFAULT_MATH_TIMEOUT_S) -> float:
  """1.0 if the response's final answer (last \\boxed{...} or text after 'answer is' /
  'Answer:', see final_answer_text) is mathematically equivalent to `answer` according
  to math-verify ('0.5' ~ '\\frac{1}{2}', '\\sqrt{8}' ~ '2\\sqrt{2}'); 0.0 otherwise, on
  any parse failure, and when the check takes longer than timeout_s seconds."""
  check_math_reference(answer)
  final = final_answer_text(response)
  if final is None or any(not ch.isprintable() for ch in final):
    return 0.0
  return _shared_math_worker().equivalent(answer, final, timeout_s)


# ----------------------------------------------------------------------------- dispatch

def check_reference(verifier: str, answer: str) -> None:
  """Raises ValueError if `answer` cannot be a reference answer for `verifier`."""
  if verifier not in VERIFIERS:
    raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
  if verifier == "integer" and canonical_integer(answer) is None:
    raise ValueError(f"an 'integer' answer must be an integer string of at most "
                     f"{MAX_ANSWER_DIGITS} digits, got {answer!r}")
  if verifier == "choice" and canonical_choice(answer) is None:
    raise ValueError(f"a 'choice' answer must be one letter A-J, got {answer!r}")
  if verifier == "math":
    check_math_reference(answer)
  if verifier == "exact" and (not isinstance(answer, str) or not answer.strip()):
    raise ValueError(f"an 'exact' answer must be a non-empty string, got {answer!r}")


def reward_for(response, answer: str, verifier: str,
               math_timeout_s: float = DEFAULT_MATH_TIMEOUT_S) -> float:
  """One response's 0/1 reward under the named verifier (see VERIFIERS)."""
  if verifier == "integer":
    return reward(response, answer)
  if verifier == "math":
    return math_equivalent(response, answer, math_timeout_s)
  if verifier == "choice":
    return choice_reward(response, answer)
  if verifier == "exact":
    return exact_reward(response, answer)
  raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")


def rewards_for(responses: Sequence[str], examples: Sequence,
                math_timeout_s: float = DEFAULT_MATH_TIMEOUT_S) -> np.ndarray:
  """responses[i] scored against examples[i] (tasks.Example: .answer, .verifier) ->
  float32[N] of 0/1 rewards. Examples without a `verifier` use 'integer'."""
  if len(responses) != len(examples):
    raise ValueError(f"responses and examples must have the same length, got "
                     f"{len(responses)} responses and {len(examples)} examples")
  return np.array([reward_for(r, ex.answer, getattr(ex, "verifier", "integer"), math_timeout_s)
                   for r, ex in zip(responses, examples)], dtype=np.float32)
