"""Flawed worked solutions for the base policy's SFT data.

Each capability family has one characteristic flawed procedure (FLAW_KINDS): the text
traces flip a sign, the image traces drop the last term, the video traces repeat the last
step, and each of the nine text families of toy_tasks.FAMILIES has its own (listed below). SFT on a mix of
right and flawed demonstrations gives a base that knows the right procedure but does not
prefer it -- so RL with verifiable rewards has something to sharpen.
"""
from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Iterator, Mapping, Sequence

import numpy as np

from copd_jax.data.answers import ANSWER_MARKER, canonical_integer, extract_answer
from copd_jax.data.examples import Example, _check_int
from copd_jax.data.toy_tasks import FAMILIES, _check_capability, compare_trace, is_shared_form

# The base policy is SFT'd on worked solutions, a fraction of which demonstrate a
# capability-specific WRONG procedure (consistently carried through to a wrong answer).
# The base then knows both procedures: at temperature 1 it often samples the right one
# (high pass@k), while greedy decoding follows whichever its demonstrations favoured. RL
# with verifiable rewards can sharpen that choice -- and each capability's flaw is its own,
# so experts learn different things. The flaws act on the worked trace only; questions,
# answers (the references) and the train/eval split are untouched.
#
#   text   sign slip: every subtraction step is written as an addition
#          "12+7=19;19-3=16#16" -> "12+7=19;19+3=22#22"
#   image  drops the LAST term of its count/sum (the bottom grid row, the last colour)
#          "1+0+2+1=4#4" -> "1+0+2=3#3"
#   video  counts the LAST term twice (the last frame, the last move)
#          "1+0+2+1=4#4" -> "1+0+2+1+1=5#5"
# A flaw that skips a frame would also stop the base from practising to perceive it, and
# then the right procedure is no more accurate than the flawed one at temperature 1 (we
# measured that: RL had nothing to prefer); counting the last frame twice keeps every
# frame described, so the choice is the aggregation alone.
#
# The nine text families (toy_tasks.FAMILIES) each have a flaw of their own too:
#   total    skips the first number       "40+3=43;43+2=45#45"  -> "3+2=5#5"
#   remain   subtracts only the last      "40-3=37;37-2=35#35"  -> "40-2=38#38"
#   max      keeps the smaller (the min)  "3<8;8>5#8"           -> "3<8;3<5#3"
#   mul      multiplies by one less       "7*8=56;56+3=59#59"   -> "7*7=49;49+3=52#52"
#   digits   counts the digits            "4+7+2=13#13"         -> "1+1+1=3#3"
#   count    marks the other letters      "1+0+1+0+1=3#3"       -> "0+1+0+1+0=2#2"
#   gap      fencepost, one less          "11-3=8#8"            -> "11-3-1=7#7"
#   next     adds the first term          "5-2=3;8+3=11#11"     -> "8+2=10#10"
#   mean     forgets to divide            "4+8=12;12/2=6#6"     -> "4+8=12#12"
# In the conflict setting (toy_tasks, "the divergence dial") an item of total or remain
# drawn in the shared surface form ('t:40,3,2?' / 'r:40,3,2?') has its twin's procedure
# as its flaw instead: the sum where the difference is asked, and the other way round.
FLAW_KINDS = {name: family.flaw_kind for name, family in FAMILIES.items()}
TWIN_FLAW = "twin_procedure"


def _parse_equation(equation: str) -> tuple[list[int], list[str]]:
  """'3-1+2=4' -> ([3, 1, 2], ['-', '+']) (the left-hand side); '3' -> ([3], [])."""
  lhs = equation.split("=")[0]
  terms, ops, number = [], [], ""
  for ch in lhs:
    if ch.isdigit():
      number += ch
    else:
      terms.append(int(number))
      ops.append(ch)
      number = ""
  terms.append(int(number))
  return terms, ops


def _apply_ops(terms: Sequence[int], ops: Sequence[str]) -> int:
  apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
  value = terms[0]
  for op, term in zip(ops, terms[1:]):
    value = apply[op](value, term)
  return value


def _equation(terms: Sequence[int], ops: Sequence[str]) -> str:
  """([3, 1], ['-']) -> '3-1=2'; ([3], []) -> '3' (a single term, as sum_trace writes it)."""
  if len(terms) == 1:
    return str(terms[0])
  lhs = str(terms[0]) + "".join(f"{op}{t}" for op, t in zip(ops, terms[1:]))
  return f"{lhs}={_apply_ops(terms, ops)}"


def _sign_slip(trace: str) -> str:
  """Every '-' becomes '+', values carried through the chained steps ('a*b=c;c-d=e')."""
  out, carried = [], None
  for equation in trace.split(";"):
    terms, ops = _parse_equation(equation)
    if carried is not None:
      terms[0] = carried  # each step starts from the previous (now flawed) result
    ops = ["+" if op == "-" else op for op in ops]
    out.append(_equation(terms, ops))
    carried = _apply_ops(terms, ops)
  return ";".join(out)


def _drop_last_term(trace: str) -> str:
  """'1+0+2=3' -> '1+0=1': a one-equation trace without its last term (and operator)."""
  terms, ops = _parse_equation(trace)
  if ";" in trace or len(terms) < 2:
    return trace
  return _equation(terms[:-1], ops[:-1])


def _repeat_last_term(trace: str) -> str:
  """'1+0+2=3' -> '1+0+2+2=5': the last term once more, with the same operator."""
  terms, ops = _parse_equation(trace)
  if ";" in trace or len(terms) < 2:
    return trace
  return _equation(terms + [terms[-1]], ops + [ops[-1]])


def _one_equation(transform):
  """A flaw on a one-equation trace ('a+b+c=s'); other traces are left as they are."""
  def flaw(trace: str) -> str:
    terms, ops = _parse_equation(trace)
    if ";" in trace or len(terms) < 2:
      return trace
    return _equation(*transform(terms, ops))
  return flaw


def _keep_smaller(trace: str) -> str:
  """'3<8;8>5' -> '3<8;3<5': the same comparisons, keeping the smaller value."""
  steps = [re.split(r"[<>=]", step) for step in trace.split(";")]
  values = [int(steps[0][0])] + [int(right) for _, right in steps]
  return compare_trace(values, keep_larger=False)[0]


def _first_as_step(trace: str) -> str:
  """'5-2=3;8+3=11' -> '8+2=10': the last term plus the first term, not the step."""
  first_equation, last_equation = trace.split(";")
  first_term = _parse_equation(first_equation)[0][1]
  last_term = _parse_equation(last_equation)[0][0]
  return _equation([last_term, first_term], ["+"])


def _one_factor_short(trace: str) -> str:
  """'7*8=56' -> '7*7=49'; '7*8=56;56+3=59' -> '7*7=49;49+3=52' (carried through)."""
  first, *rest = trace.split(";")
  terms, ops = _parse_equation(first)
  out = [_equation([terms[0], terms[1] - 1], ops)]
  for equation in rest:
    terms, ops = _parse_equation(equation)
    terms[0] = _apply_ops(*_parse_equation(out[-1]))
    out.append(_equation(terms, ops))
  return ";".join(out)


def _step_terms(trace: str) -> tuple[list[int], str]:
  """'40+3=43;43+2=45' -> ([40, 3, 2], '+'): the numbers of a one-operator step trace."""
  equations = [_parse_equation(e) for e in trace.split(";")]
  return equations[0][0] + [terms[1] for terms, _ in equations[1:]], equations[0][1][0]


def _steps(terms: Sequence[int], op: str) -> str:
  """([40, 3, 2], '-') -> '40-3=37;37-2=35'; a single number is itself."""
  if len(terms) == 1:
    return str(terms[0])
  out, value = [], terms[0]
  for term in terms[1:]:
    result = _apply_ops([value, term], [op])
    out.append(f"{value}{op}{term}={result}")
    value = result
  return ";".join(out)


def _skip_first_step(trace: str) -> str:
  """'40+3=43;43+2=45' -> '3+2=5': the same steps without the first number."""
  terms, op = _step_terms(trace)
  return _steps(terms[1:], op)


def _subtract_last_only(trace: str) -> str:
  """'40-3=37;37-2=35' -> '40-2=38': only the last number taken away."""
  terms, op = _step_terms(trace)
  return _steps([terms[0], terms[-1]], op)


def _twin_procedure(trace: str) -> str:
  """'40+3=43;43+2=45' <-> '40-3=37;37-2=35': the conflict partner's procedure on the
  same numbers."""
  terms, op = _step_terms(trace)
  return _steps(terms, "-" if op == "+" else "+")


_FLAWS = {
    "sign_slip": _sign_slip,
    "drop_last_term": _drop_last_term,
    "repeat_last_term": _repeat_last_term,
    "skip_first_term": _skip_first_step,
    "subtract_last_only": _subtract_last_only,
    "keep_smaller": _keep_smaller,
    "one_factor_short": _one_factor_short,
    "count_digits": _one_equation(lambda t, o: ([1] * len(t), o)),
    "complement": _one_equation(lambda t, o: ([1 - x for x in t], o)),
    "fencepost": _one_equation(lambda t, o: (t + [1], o + ["-"])),
    "first_as_step": _first_as_step,
    "no_divide": lambda trace: trace.split(";")[0],
    TWIN_FLAW: _twin_procedure,
}


def _answer_of(kind: str, trace: str) -> str:
  if kind == "keep_smaller":  # comparisons: the kept value is the smaller of the last
    return str(min(int(v) for v in re.split(r"[<>=]", trace.split(";")[-1])))
  last = trace.split(";")[-1]
  return last.split("=")[-1] if "=" in last else last


def flaw_kind(example: Example) -> str:
  """The flawed procedure an example's demonstrations show (FLAW_KINDS, or TWIN_FLAW for
  a conflict family's item in the shared surface form)."""
  _check_capability(example.capability, "example.capability")
  return TWIN_FLAW if is_shared_form(example) else FLAW_KINDS[example.capability]


def flawed_solution(example: Example) -> str:
  """The example's worked solution done with its family's flawed procedure (see
  FLAW_KINDS); the trace and the answer after ANSWER_MARKER agree with each other, so
  the flaw is a consistent wrong procedure, not a typo. May equal the correct solution
  when the flaw does not change anything (no subtraction; a dropped term of 0 still
  changes the trace but not the answer)."""
  kind = flaw_kind(example)
  trace = example.solution.rsplit(ANSWER_MARKER, 1)[0]
  flawed = _FLAWS[kind](trace)
  return f"{flawed}{ANSWER_MARKER}{_answer_of(kind, flawed)}"


def with_flawed_demonstrations(examples: Iterator[Example], flaw_rate: Mapping[str, float],
                               seed: int) -> Iterator[Example]:
  """SFT demonstrations: each example's solution replaced, with probability
  flaw_rate[capability], by flawed_solution(example). Deterministic in `seed`."""
  for capability, rate in flaw_rate.items():
    _check_capability(capability, "flaw_rate key")
    if (isinstance(rate, bool) or not isinstance(rate, numbers.Real)
        or not 0.0 <= rate <= 1.0):
      raise ValueError(f"flaw_rate[{capability!r}] must be a number in [0, 1], got {rate!r}")
  # Tag 11 keeps this RNG apart from make_example keys (4 words) and the mixture (tag 7).
  rng = np.random.default_rng([_check_int("seed", seed, 0), 11])

  def demonstrations():
    for example in examples:
      if rng.random() < flaw_rate.get(example.capability, 0.0):
        example = dataclasses.replace(example, solution=flawed_solution(example))
      yield example
  return demonstrations()


# ------------------------------------------------------------- classifying model answers

CORRECT, FLAWED, OTHER = "correct", "flawed", "other"


def flawed_answer(example: Example) -> str:
  """The canonical answer the example's flawed procedure reaches (flawed_solution's)."""
  return canonical_integer(flawed_solution(example).rsplit(ANSWER_MARKER, 1)[1])


def flaw_distinguishable(example: Example) -> bool:
  """True when the flawed procedure reaches another answer than the reference, so an
  answer can tell the two procedures apart (a text item with no subtraction cannot)."""
  return flawed_answer(example) != canonical_integer(example.answer)


def classify_response(example: Example, response: str) -> str:
  """CORRECT (the reference answer), FLAWED (the answer of the example's flawed
  procedure, FLAW_KINDS, where that differs from the reference) or OTHER (any other
  answer, or none: malformed model output is OTHER, never an error).

  Judged on the final answer after ANSWER_MARKER (answers.extract_answer), not the
  trace: a response that writes the flawed procedure's result is following that
  procedure, whatever trace it wrote. example: a toy-suite example (FAMILIES)."""
  answer = extract_answer(response)
  if answer is None:
    return OTHER
  if answer == canonical_integer(example.answer):
    return CORRECT
  return FLAWED if answer == flawed_answer(example) else OTHER


def flawed_answer_rate(examples: Sequence[Example], responses: Sequence[str]) -> tuple[float, int]:
  """(share of FLAWED answers, count) over the examples whose flawed answer differs from
  the reference (flaw_distinguishable); (nan, 0) when none does. examples[i] and
  responses[i] pair up (same length)."""
  if len(examples) != len(responses):
    raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
  judged = [classify_response(ex, r) for ex, r in zip(examples, responses)
            if flaw_distinguishable(ex)]
  if not judged:
    return float("nan"), 0
  return sum(j == FLAWED for j in judged) / len(judged), len(judged)
