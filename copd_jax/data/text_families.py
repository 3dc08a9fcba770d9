"""The text-only task families (copd_jax/data/toy_tasks.py registers them in FAMILIES):
the original text capability's generator (_make_text) and nine more. Each draws a problem and writes its correct procedure's
worked trace; toy_flaws holds each family's flawed procedure (FLAW_KINDS). Nine text
families join the three, each with a procedure and a flaw of
its own, so up to twelve branches can each learn something different:

  total   "add up 40,3,2?"     "40+3=43;43+2=45"  flaw: skips the first number
  remain  "from 40 take 3,2?"  "40-3=37;37-2=35"  flaw: subtracts only the last
  max     "max 3,8,5?"         "3<8;8>5#8"        flaw: keeps the smaller
  mul     "7 times 8 plus 3?"  "7*8=56;56+3=59"   flaw: multiplies by one less
  digits  "digit sum 472?"     "4+7+2=13"         flaw: counts the digits
  count   "a in abaca?"        "1+0+1+0+1=3"      flaw: marks the other letters
  gap     "gap 3,11?"          "11-3=8"           flaw: fencepost, one less
  next    "next 2,5,8?"        "5-2=3;8+3=11"     flaw: adds the first term
  mean    "mean 4,8?"          "4+8=12;12/2=6"    flaw: forgets to divide

Conflict: the divergence dial (`conflict`, config.data.conflict, in [0, 1]). In the
suite above every family is recognisable from its prompt, so independent experts barely
interfere and a weight average keeps each one's skill. The dial makes two families,
total and remain (CONFLICT_FAMILIES, each the other's `twin`), conflict on prompts that
look alike. With probability `conflict` an item of either takes a shared surface form,
the same numbers behind a one-letter cue: 't:40,3,2?' asks for 40+3=43;43+2=45,
'r:40,3,2?' for 40-3=37;37-2=35 (one problem distribution fits both: first >= the rest, sum <= 99). In
that form each family's flawed procedure is its twin's correct one, so at flaw rate 0.5
the base's demonstrations add as often under 't' as under 'r': the base ignores the cue.
An expert trained on one family then learns "add" (or "subtract") on states the other
family shares, the two experts learn opposite choices there, and their average falls
back towards the base; a policy that reads the cue can still get both right. The other
items keep their distinct forms (and own flaws), so conflict = 0 is an ordinary pair of
families and the fraction of shared items sets how far merging can fail. The base is
one policy for every level: its demonstrations use the shared form at SFT_CONFLICT; the
dial sets what RL trains on and what evaluation measures. The form is drawn first from
each item's RNG, so levels are coupled: an item shared at 0.3 is shared at 0.6 too.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from copd_jax.data.task_traces import (
    _digits, _int, _list_chars, _solution, _solution_chars, _sum_trace_chars, step_trace,
    sum_trace)

# difficulty -> (number of terms, largest +/- operand); '*' (from difficulty 1) only
# ever appears as the first operation, with single-digit factors, so reading left to
# right agrees with operator precedence.
_TEXT_LEVELS = {0: (2, 9), 1: (3, 9), 2: (3, 20), 3: (4, 20)}
_MAX_WORD_TERMS = 3  # longer word problems would exceed the question length budget
_WORD_FOR_OP = {"+": "got", "-": "lost"}


def _make_text(rng: np.random.Generator, difficulty: int) -> tuple[str, str, int]:
  """-> (question, solution, answer): '12+7-3=?' or 'had 12,got 7,lost 3?' style."""
  num_terms, max_operand = _TEXT_LEVELS[difficulty]
  if difficulty >= 1 and rng.random() < 1 / 3:
    first, steps = _int(rng, 0, 9), [("*", _int(rng, 0, 9))]
  else:
    first, steps = _int(rng, 0, max_operand), []
  value = first * steps[0][1] if steps else first
  while len(steps) < num_terms - 1:
    op = "+" if rng.random() < 0.5 else "-"
    # Keep every intermediate value in [0, 99]: answers are small non-negative ints.
    operand = _int(rng, 0, min(max_operand, 99 - value) if op == "+" else min(max_operand, value))
    steps.append((op, operand))
    value = value + operand if op == "+" else value - operand

  if num_terms <= _MAX_WORD_TERMS and rng.random() < 0.5:
    if steps[0][0] == "*":
      head, rest = f"{first} bags of {steps[0][1]}", steps[1:]
    else:
      head, rest = f"had {first}", steps
    question = head + "".join(f",{_WORD_FOR_OP[op]} {x}" for op, x in rest) + "?"
  else:
    question = str(first) + "".join(f"{op}{x}" for op, x in steps) + "=?"

  if all(op == "+" for op, _ in steps):
    trace = sum_trace([first] + [x for _, x in steps])  # same format as vision counts
  else:
    trace, _ = step_trace(first, steps)
  return question, _solution(trace, value), value


# The one character that tells the conflict pair's shared form apart (toy_tasks.FAMILIES).
TOTAL_CUE, REMAIN_CUE = "t", "r"


# ------------------------------------------------------------------ the nine text families
# Each draws a problem and writes its correct procedure's worked trace; toy_flaws holds
# each family's flawed procedure (FLAW_KINDS). Levels: difficulty -> the family's sizes.

def _join(values: Sequence[int]) -> str:
  return ",".join(map(str, values))


# total / remain, the conflict pair: (terms, largest operand after the first, largest
# excess of the first over the sum of the others). The first number is at least the sum
# of the others (so subtracting them stays >= 0) and the sum of all of them is at most 99
# (so adding them stays < 100): one problem fits both. Traces take one operation per
# step ('28+4=32;32+2=34'), as the text family's do: a 3-term sum in one equation was
# beyond the small base (a pilot's experts chose the right operation but reached only
# 15-20% on their own items).
_PAIR_LEVELS = {0: (2, 9, 9), 1: (3, 9, 20), 2: (3, 20, 40), 3: (3, 30, 40)}
_PAIR_MAX_REST = 49


def _pair_problem(rng, difficulty: int) -> list[int]:
  """[first, *rest]: first >= sum(rest), first + sum(rest) <= 99."""
  num_terms, max_operand, max_excess = _PAIR_LEVELS[difficulty]
  rest = []
  for _ in range(num_terms - 1):
    rest.append(_int(rng, 0, min(max_operand, _PAIR_MAX_REST - sum(rest))))
  first = sum(rest) + _int(rng, 0, min(max_excess, 99 - 2 * sum(rest)))
  return [first] + rest


def _total_trace(terms: Sequence[int]) -> tuple[str, int]:
  return step_trace(terms[0], [("+", t) for t in terms[1:]])


def _remain_trace(terms: Sequence[int]) -> tuple[str, int]:
  return step_trace(terms[0], [("-", t) for t in terms[1:]])


def _make_total(rng, difficulty, shared):
  terms = _pair_problem(rng, difficulty)
  question = (f"{TOTAL_CUE}:{_join(terms)}?" if shared
              else f"add up {_join(terms)}?")
  trace, answer = _total_trace(terms)
  return question, _solution(trace, answer), answer


def _make_remain(rng, difficulty, shared):
  terms = _pair_problem(rng, difficulty)
  question = (f"{REMAIN_CUE}:{_join(terms)}?" if shared
              else f"from {terms[0]} take {_join(terms[1:])}?")
  trace, answer = _remain_trace(terms)
  return question, _solution(trace, answer), answer


_MAX_LEVELS = {0: (3, 9), 1: (3, 20), 2: (4, 20), 3: (4, 50)}  # (numbers, largest)


def compare_trace(values: Sequence[int], keep_larger: bool = True) -> tuple[str, int]:
  """([3, 8, 5]) -> ('3<8;8>5', 8): compare the kept value with the next, left to right."""
  kept, steps = values[0], []
  for value in values[1:]:
    relation = "<" if kept < value else ">" if kept > value else "="
    steps.append(f"{kept}{relation}{value}")
    kept = max(kept, value) if keep_larger else min(kept, value)
  return ";".join(steps), kept


def _make_max(rng, difficulty, shared):
  count, largest = _MAX_LEVELS[difficulty]
  values = [_int(rng, 0, largest) for _ in range(count)]
  trace, answer = compare_trace(values)
  return f"max {_join(values)}?", _solution(trace, answer), answer


# (smallest, largest first factor, smallest, largest second factor, add a term?)
_MUL_LEVELS = {0: (1, 9, 1, 9, False), 1: (2, 9, 2, 9, True), 2: (2, 11, 2, 9, True),
               3: (2, 19, 2, 5, True)}


def _make_mul(rng, difficulty, shared):
  """'7 times 8?' -> '7*8=56'; from difficulty 1 '7 times 8 plus 3?' -> '7*8=56;56+3=59'."""
  low_a, high_a, low_b, high_b, plus = _MUL_LEVELS[difficulty]
  a, b = _int(rng, low_a, high_a), _int(rng, low_b, high_b)
  if not plus:
    return f"{a} times {b}?", _solution(f"{a}*{b}={a * b}", a * b), a * b
  c = _int(rng, 0, min(20, 99 - a * b))
  trace, answer = step_trace(a, [("*", b), ("+", c)])
  return f"{a} times {b} plus {c}?", _solution(trace, answer), answer


_DIGITS_LEVELS = {0: 3, 1: 4, 2: 5, 3: 6}  # digits of the number


def _make_digits(rng, difficulty, shared):
  digits = [_int(rng, 1, 9)] + [_int(rng, 0, 9) for _ in range(_DIGITS_LEVELS[difficulty] - 1)]
  number = "".join(map(str, digits))
  return f"digit sum {number}?", _solution(sum_trace(digits), sum(digits)), sum(digits)


_COUNT_LEVELS = {0: (4, "abc"), 1: (5, "abc"), 2: (6, "abc"), 3: (8, "abcd")}  # (length, letters)


def _make_count(rng, difficulty, shared):
  length, letters = _COUNT_LEVELS[difficulty]
  word = "".join(letters[_int(rng, 0, len(letters) - 1)] for _ in range(length))
  target = letters[_int(rng, 0, len(letters) - 1)]
  hits = [int(ch == target) for ch in word]
  return f"{target} in {word}?", _solution(sum_trace(hits), sum(hits)), sum(hits)


_GAP_LEVELS = {0: 20, 1: 50, 2: 99, 3: 99}  # largest number


def _make_gap(rng, difficulty, shared):
  largest = _GAP_LEVELS[difficulty]
  low = _int(rng, 0, largest - 1)
  high = _int(rng, low + 1, largest)  # never equal: the gap is >= 1
  shown = (low, high) if rng.random() < 0.5 else (high, low)
  return (f"gap {_join(shown)}?", _solution(f"{high}-{low}={high - low}", high - low),
          high - low)


# (terms shown, largest first term, largest step)
_NEXT_LEVELS = {0: (3, 9, 9), 1: (3, 20, 9), 2: (4, 20, 9), 3: (4, 30, 15)}


def _make_next(rng, difficulty, shared):
  count, largest_start, largest_step = _NEXT_LEVELS[difficulty]
  start, step = _int(rng, 0, largest_start), _int(rng, 1, largest_step)
  terms = [start + i * step for i in range(count)]
  trace = f"{terms[1]}-{terms[0]}={step};{terms[-1]}+{step}={terms[-1] + step}"
  return f"next {_join(terms)}?", _solution(trace, terms[-1] + step), terms[-1] + step


_MEAN_LEVELS = {0: (2, 20), 1: (2, 40), 2: (3, 20), 3: (3, 33)}  # (numbers, largest)


def _make_mean(rng, difficulty, shared):
  count, largest = _MEAN_LEVELS[difficulty]
  values = [_int(rng, 0, largest) for _ in range(count - 1)]
  # The last number makes the sum divisible by the count (still <= largest).
  remainder = -sum(values) % count
  values.append(remainder + count * _int(rng, 0, (largest - remainder) // count))
  total = sum(values)
  trace = f"{sum_trace(values)};{total}/{count}={total // count}"
  return f"mean {_join(values)}?", _solution(trace, total // count), total // count


# ------------------------------------------ length bounds (characters) of each family
def _pair_chars(difficulty: int) -> tuple[int, int]:
  # total / remain in both forms: first <= 99, the rest <= their largest operand.
  terms, largest, _ = _PAIR_LEVELS[difficulty]
  d = _digits(largest)
  rest = _list_chars(terms - 1, largest)
  question = max(len("add up ?") + 2 + 1 + rest, len("from  take ?") + 2 + rest,
                 len("t:?") + 2 + 1 + rest)
  # "aa+b=cc;cc+b=dd": (terms - 1) steps of 2 + 1 + d + 1 + 2 chars, joined by ';'.
  return question, _solution_chars((terms - 1) * (6 + d) + terms - 2, 99)


def _max_chars(difficulty: int) -> tuple[int, int]:
  count, largest = _MAX_LEVELS[difficulty]
  d = _digits(largest)
  return (len("max ?") + _list_chars(count, largest),
          _solution_chars((count - 1) * (2 * d + 1) + count - 2, largest))


def _mul_chars(difficulty: int) -> tuple[int, int]:
  _, high_a, _, high_b, plus = _MUL_LEVELS[difficulty]
  product = high_a * high_b
  question = _digits(high_a) + len(" times ?") + _digits(high_b)
  trace = _digits(high_a) + 1 + _digits(high_b) + 1 + _digits(product)
  if plus:  # " plus cc" and ";pp+cc=rr"
    question += len(" plus ") + 2
    trace += 1 + _digits(product) + 1 + 2 + 1 + 2
  return question, _solution_chars(trace, 99 if plus else product)


def _digits_chars(difficulty: int) -> tuple[int, int]:
  n = _DIGITS_LEVELS[difficulty]
  return len("digit sum ?") + n, _solution_chars(_sum_trace_chars(n, 9, 9 * n), 9 * n)


def _count_chars(difficulty: int) -> tuple[int, int]:
  n, _ = _COUNT_LEVELS[difficulty]
  return len("a in ?") + n, _solution_chars(_sum_trace_chars(n, 1, n), n)


def _gap_chars(difficulty: int) -> tuple[int, int]:
  largest = _GAP_LEVELS[difficulty]
  d = _digits(largest)
  return len("gap ?") + _list_chars(2, largest), _solution_chars(d + 1 + d + 2 + 1 + d, largest)


def _next_chars(difficulty: int) -> tuple[int, int]:
  count, start, step = _NEXT_LEVELS[difficulty]
  last = start + (count - 1) * step
  d, ds, da = _digits(last), _digits(step), _digits(last + step)
  # "b-a=s;l+s=n"
  trace = (2 * d + 2 + ds) + 1 + (d + 2 + ds + da)
  return len("next ?") + _list_chars(count, last), _solution_chars(trace, last + step)


def _mean_chars(difficulty: int) -> tuple[int, int]:
  count, largest = _MEAN_LEVELS[difficulty]
  total = count * largest
  trace = _sum_trace_chars(count, largest, total) + 1 + _digits(total) + 3 + _digits(largest)
  return len("mean ?") + _list_chars(count, largest), _solution_chars(trace, total)


_TEXT_FAMILY_CHARS = {"total": _pair_chars, "remain": _pair_chars, "max": _max_chars,
                      "mul": _mul_chars, "digits": _digits_chars, "count": _count_chars,
                      "gap": _gap_chars, "next": _next_chars, "mean": _mean_chars}
