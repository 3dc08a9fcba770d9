"""What a reward function may return, and what happens when it fails.

A reward plug-in (config.reward.fn) is user code: it may raise, or return NaN, an
infinity, 1e300 (inf once stored as float32) or something that is not a number. Each of
these is a plug-in error (RewardFunctionError): the response scores 0, the error is
counted per step (`reward/errors`), the first traceback is printed once, and when the
errors reach `reward.max_error_fraction` of a batch's responses the run stops with an
error naming the function and the exception (check_error_fraction).

Imported by the verifier workers too: nothing heavy here.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import sys

# The largest finite float32: rewards are stored in float32 arrays.
FLOAT32_MAX = 3.4028234663852886e38
DEFAULT_MAX_ERROR_FRACTION = 1.0


class RewardFunctionError(ValueError):
  """A reward function raised, or returned a value that is not a finite float32 number.
  The message names the function."""


def check_reward_value(value, fn_name: str) -> float:
  """A reward function's return value -> float, checked in float64 before it is stored.

  A bool or a real number (int, float, numpy scalar) whose float64 value is finite and
  within float32's range is accepted; anything else (a string, None, an array, NaN,
  +-inf, 1e300, a 400-digit int) raises RewardFunctionError naming `fn_name`."""
  if isinstance(value, bool):
    return float(value)
  if not isinstance(value, numbers.Real):
    raise RewardFunctionError(f"reward function {fn_name} returned {type(value).__name__} "
                              f"{_short_repr(value)}, not a number")
  try:
    as_float = float(value)  # float64; a huge int overflows here
  except (OverflowError, ValueError, TypeError) as e:
    raise RewardFunctionError(f"reward function {fn_name} returned {_short_repr(value)}, "
                              f"which is not a float ({type(e).__name__})") from None
  if not math.isfinite(as_float):
    raise RewardFunctionError(f"reward function {fn_name} returned {as_float!r}, not a "
                              "finite number")
  if abs(as_float) > FLOAT32_MAX:
    raise RewardFunctionError(f"reward function {fn_name} returned {as_float!r}, beyond "
                              f"float32's range (+-{FLOAT32_MAX:.4g}) in which rewards are "
                              "stored")
  return as_float


def _short_repr(value, limit: int = 60) -> str:
  try:
    text = repr(value)
  except Exception:  # a user object whose repr raises
    text = f"<{type(value).__name__}>"
  return text if len(text) <= limit else text[:limit] + "..."


@dataclasses.dataclass(frozen=True)
class RewardFailure:
  """A reward function's failure on one response, sent back by a verifier worker in
  place of its float: `message` is one line naming the function and the exception,
  `traceback` the worker's full traceback."""
  message: str
  traceback: str = ""


def failure_of(error: BaseException, fn_name: str, traceback_text: str) -> RewardFailure:
  """The RewardFailure of an exception raised by (or for the result of) `fn_name`."""
  if isinstance(error, RewardFunctionError):
    return RewardFailure(str(error), traceback_text)
  return RewardFailure(f"reward function {fn_name} raised {type(error).__name__}: "
                       f"{str(error)[:300]}", traceback_text)


_first_traceback_printed = False


def report_failures(failures: list[RewardFailure], responses: int,
                    max_error_fraction: float, stream=None) -> None:
  """After a batch: prints the first failure's traceback (once per process), and raises
  RewardFunctionError when len(failures) reaches max_error_fraction of `responses`
  (1.0: every response failed; 0.0: any failure). failures: one per failed response."""
  global _first_traceback_printed
  if not failures:
    return
  if not _first_traceback_printed:
    _first_traceback_printed = True
    print(f"warning: {failures[0].message} (a response scores 0 when its reward function "
          f"fails; printed once)\n{failures[0].traceback}", file=stream or sys.stderr,
          flush=True)
  if len(failures) >= max_error_fraction * responses:
    raise RewardFunctionError(
        f"{failures[0].message} -- {len(failures)} of {responses} responses of this batch "
        f"failed (config.reward.max_error_fraction={max_error_fraction:g}), so the run stops")
