"""Flawed worked solutions for the base policy's SFT data.

Each capability has one characteristic slip (FLAW_KINDS): the text traces flip a sign, the
image traces drop the last term, the video traces repeat the last step. SFT on a mix of
right and flawed demonstrations gives a base that knows the right procedure but does not
prefer it -- so RL with verifiable rewards has something to sharpen.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Iterator, Mapping, Sequence

import numpy as np

from copd_jax.data.answers import ANSWER_MARKER
from copd_jax.data.examples import Example, _check_int
from copd_jax.data.toy_tasks import _check_capability

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
FLAW_KINDS = {"text": "sign_slip", "image": "drop_last_term", "video": "repeat_last_term"}


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


def flawed_solution(example: Example) -> str:
  """The example's worked solution done with its capability's flawed procedure (see
  FLAW_KINDS); the trace and the answer after ANSWER_MARKER agree with each other, so
  the flaw is a consistent wrong procedure, not a typo. May equal the correct solution
  when the flaw does not change anything (no subtraction; a dropped term of 0 still
  changes the trace but not the answer)."""
  _check_capability(example.capability, "example.capability")
  trace = example.solution.rsplit(ANSWER_MARKER, 1)[0]
  kind = FLAW_KINDS[example.capability]
  if kind == "sign_slip":
    flawed = _sign_slip(trace)
  elif kind == "repeat_last_term":
    flawed = _repeat_last_term(trace)
  else:
    flawed = _drop_last_term(trace)
  last = flawed.split(";")[-1]
  answer = last.split("=")[-1] if "=" in last else last
  return f"{flawed}{ANSWER_MARKER}{answer}"


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
