"""Verifiers: exact final-answer match; 0 (never an exception) on any malformed output,
in bounded time."""
import time

import numpy as np
import pytest

from copd_jax.data import answers as verifiers
from copd_jax.data.answers import ANSWER_MARKER, batch_rewards, extract_answer, reward

MB = 1 << 20


@pytest.mark.parametrize("response, expected", [
    ("3+4=7;7*2=14#14", "14"),
    ("#7", "7"),
    ("1#2#3", "3"),  # the LAST marker counts
    ("x=5#  42 \t", "42"),
    ("#\n9\n", "9"),
    ("#007", "7"),
    ("#+5", "5"),
    ("#-0", "0"),
    ("#-12", "-12"),
    ("#999999", "999999"),
])
def test_extract_answer_valid(response, expected):
  assert extract_answer(response) == expected


@pytest.mark.parametrize("response", [
    "", "#", "# ", "##", "7", "no marker 14", "#14.", "#1.5", "#1e3", "#0x1f", "#1 2",
    "#- 5", "#--5", "#+", "#-", "#abc", "#14#", "#1234567",  # 7 digits: too long
    "#\u0661\u0662",  # Arabic-Indic digits
    "#\uff11\uff12",  # full-width digits
    "#\u00b2", "#\u0e51",  # superscript two, Thai digit one
    "#__import__('os').system('echo hi')", "__import__('os')",
    "#eval('1+1')", "#(lambda: 7)()", "#7;import os", "#\x007", "#7\x00",
])
def test_extract_answer_rejects_malformed(response):
  assert extract_answer(response) is None
  assert reward(response, "7") == 0.0


@pytest.mark.parametrize("response", [None, b"#7", 7, 7.0, ["#7"], object()])
def test_non_string_output_gets_zero(response):
  assert extract_answer(response) is None
  assert reward(response, "7") == 0.0


def test_reward_exact_match():
  assert reward("2+3=5#5", "5") == 1.0
  assert reward("2+3=5#6", "5") == 0.0
  assert reward("2+3=5#05", "5") == 1.0  # compared as integers
  assert reward("#5", "50") == 0.0
  assert reward("#-3", "3") == 0.0


@pytest.mark.parametrize("bad_answer", ["", "1.5", "x", "1234567", None])
def test_malformed_reference_answer_is_a_value_error(bad_answer):
  with pytest.raises(ValueError, match="answer"):
    reward("#1", bad_answer)


def test_batch_rewards():
  out = batch_rewards(["#1", "1", "a#2", "#3"], ["1", "1", "2", "4"])
  assert out.dtype == np.float32 and out.shape == (4,)
  np.testing.assert_array_equal(out, [1, 0, 1, 0])
  with pytest.raises(ValueError, match="same length"):
    batch_rewards(["#1"], ["1", "2"])


def test_marker_must_be_in_the_examined_tail():
  far = "#5" + " " * verifiers.MAX_TAIL_CHARS
  assert extract_answer(far) is None
  near = "x" * 10_000 + "#5" + " " * (verifiers.MAX_TAIL_CHARS - 3)
  assert extract_answer(near) == "5"


ADVERSARIAL = {
    "digits_1mb": ANSWER_MARKER + "9" * MB,
    "digits_1mb_then_answer": "9" * MB + "#7",
    "markers_1mb": ANSWER_MARKER * MB,
    "alternating_1mb": "1#" * (MB // 2),
    "spaces_1mb": "#" + " " * MB,
    "arabic_digits_1mb": "#" + "\u0663" * MB,
    "code_1mb": "__import__('os')." * (MB // 17),
    "nested_parens_1mb": "#" + "(" * MB,
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_inputs_are_fast(name):
  response = ADVERSARIAL[name]
  # CPU time of this process, not wall time: the bound is on the work (no catastrophic
  # backtracking), which a busy neighbour on a 2-core machine must not decide.
  start = time.process_time()
  for _ in range(10):
    value = reward(response, "7")
  per_call = (time.process_time() - start) / 10
  assert value in (0.0, 1.0)
  assert value == (1.0 if name == "digits_1mb_then_answer" else 0.0)
  assert per_call < 0.05, f"{name}: {per_call * 1e3:.1f} ms per call"


def test_batch_of_adversarial_inputs_is_fast():
  responses = list(ADVERSARIAL.values()) * 25
  start = time.process_time()  # CPU time (see test_adversarial_inputs_are_fast)
  out = batch_rewards(responses, ["7"] * len(responses))
  assert time.process_time() - start < 0.5
  assert out.shape == (len(responses),) and set(np.unique(out)) <= {0.0, 1.0}
