"""Worked-solution traces every toy task family writes: small-integer arithmetic, one
equation per step (copd_jax/data/toy_tasks.py builds the families on them)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from copd_jax.data.answers import ANSWER_MARKER


# The latent skill every capability shares: small-integer arithmetic written as below.
def sum_trace(terms: Sequence[int]) -> str:
  """[1, 0, 2] -> '1+0+2=3'; a single term is just itself ('3')."""
  if len(terms) == 1:
    return str(terms[0])
  return "+".join(map(str, terms)) + f"={sum(terms)}"


def chain_trace(start: int, op: str, terms: Sequence[int]) -> str:
  """(3, '-', [1, 0, 1]) -> '3-1-0-1=1': one equation, one operator throughout."""
  sign = 1 if op == "+" else -1
  return str(start) + "".join(f"{op}{t}" for t in terms) + f"={start + sign * sum(terms)}"


def step_trace(first: int, steps: Sequence[tuple[str, int]]) -> tuple[str, int]:
  """(3, [('*', 4), ('+', 5)]) -> ('3*4=12;12+5=17', 17): one equation per step."""
  apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
  value, equations = first, []
  for op, operand in steps:
    result = apply[op](value, operand)
    equations.append(f"{value}{op}{operand}={result}")
    value = result
  return ";".join(equations), value


def _solution(trace: str, answer: int) -> str:
  return f"{trace}{ANSWER_MARKER}{answer}"


def _int(rng: np.random.Generator, low: int, high: int) -> int:
  """Uniform integer in [low, high], both inclusive."""
  return int(rng.integers(low, high, endpoint=True))


# Length bounds of traces (characters), for the tasks' max_lengths.
def _digits(n: int) -> int:
  return len(str(n))


def _sum_trace_chars(num_terms: int, max_term: int, max_total: int) -> int:
  if num_terms == 1:
    return _digits(max_term)
  return num_terms * _digits(max_term) + (num_terms - 1) + 1 + _digits(max_total)


def _solution_chars(trace_chars: int, max_answer: int) -> int:
  return trace_chars + len(ANSWER_MARKER) + _digits(max_answer)



def _list_chars(count: int, largest: int) -> int:
  """'a,b,c': count numbers of at most _digits(largest) digits, comma-separated."""
  return count * _digits(largest) + count - 1
