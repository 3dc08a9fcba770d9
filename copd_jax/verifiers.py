"""Verifiable rewards: parse the final answer after the answer marker, compare exactly.

Responses are model output, so anything may arrive: every function here returns a
value (never raises) on any response and does bounded work however long it is -- it
only looks at the last `MAX_TAIL_CHARS` characters, uses no regular expressions, never
converts an unbounded digit string to int, and never evaluates text.
"""
from __future__ import annotations

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
