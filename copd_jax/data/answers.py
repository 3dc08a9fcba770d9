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


# Record datasets (copd_jax/data/records.py) name a verifier per example. Every verifier below
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
  """The answer stated after the last answer phrase ('The final answer is', 'Answer:'),
  or None: its first non-empty line, up to the end of that sentence, without a leading
  ':' and surrounding '**' / '$' ('The answer is: **7**.' -> '7')."""
  lowered = text.lower()
  cut, phrase = max((lowered.rfind(p), p) for p in _ANSWER_PHRASES)
  if cut < 0:
    return None
  return _phrase_answer(text[cut + len(phrase):])


def _phrase_answer(text: str) -> str:
  """The stated answer at the start of `text` (see _after_answer_phrase)."""
  text = text.lstrip(" \t:")
  line = next((line for line in text.splitlines() if line.strip()), "")
  for end in (". ", ".\t", "; "):  # 'The answer is 7. So ...': the sentence ends there
    if end in line:
      line = line[:line.index(end)]
  line = line.strip()
  while line and line[-1] in ".,;":  # a sentence's final period is not part of '7.'
    line = line[:-1].rstrip()
  for mark in ("**", "$"):
    if len(line) > 2 * len(mark) - 1 and line.startswith(mark) and line.endswith(mark):
      line = line[len(mark):-len(mark)].strip()
  return line


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
