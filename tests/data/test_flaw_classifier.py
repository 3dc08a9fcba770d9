"""toy_flaws.classify_response / flawed_answer_rate: a model's answer judged against the
reference and against the answer of the example's flawed procedure, on hand-made items
whose right and flawed answers are worked out by hand in the comments."""
import math

import numpy as np
import pytest

from copd_jax.data import toy_flaws
from copd_jax.data.examples import Example
from copd_jax.data.toy_flaws import CORRECT, FLAWED, OTHER

# text (sign slip): 9-3=6, 6+1=7; flawed 9+3=12, 12+1=13.
TEXT = Example("text", "had 9,lost 3,got 1?", "7", "9-3=6;6+1=7#7")
# text with nothing to subtract: the flawed procedure gives the same 7 -> not judged.
TEXT_SAME = Example("text", "had 5,got 2?", "7", "5+2=7#7")
# mean (forgets to divide): 4+8=12, 12/2=6; flawed stops at 12.
MEAN = Example("mean", "mean of 4,8?", "6", "4+8=12;12/2=6#6", modality="text")
# video (counts the last term twice): 2+2+0+3=7; flawed 2+2+0+3+3=10.
VIDEO = Example("video", "dots in all?", "7", "2+2+0+3=7#7",
                frames=np.zeros((4, 32, 32, 3), np.float32))


def test_flawed_answers_by_hand():
  assert toy_flaws.flawed_answer(TEXT) == "13"
  assert toy_flaws.flawed_answer(TEXT_SAME) == "7"
  assert toy_flaws.flawed_answer(MEAN) == "12"
  assert toy_flaws.flawed_answer(VIDEO) == "10"
  assert toy_flaws.flaw_distinguishable(TEXT)
  assert not toy_flaws.flaw_distinguishable(TEXT_SAME)
  assert toy_flaws.flaw_distinguishable(MEAN) and toy_flaws.flaw_distinguishable(VIDEO)


@pytest.mark.parametrize("example,response,expected", [
    (TEXT, "9-3=6;6+1=7#7", CORRECT),
    (TEXT, "#007", CORRECT),                 # canonical integer
    (TEXT, "9+3=12;12+1=13#13", FLAWED),
    (TEXT, "garbage trace#13", FLAWED),      # the answer decides, not the trace
    (TEXT, "9-3=6;6+1=7#8", OTHER),
    (TEXT, "9-3=6;6+1=7", OTHER),            # no answer marker
    (TEXT, "", OTHER),
    (TEXT, "#13.5", OTHER),                  # malformed answer
    (TEXT_SAME, "#7", CORRECT),              # right and flawed agree: counted right
    (MEAN, "4+8=12#12", FLAWED),
    (MEAN, "4+8=12;12/2=6#6", CORRECT),
    (VIDEO, "2+2+0+3+3=10#10", FLAWED),
    (VIDEO, "2+2+0=4#4", OTHER),             # the image flaw's answer is not this one's
])
def test_classify_response_by_hand(example, response, expected):
  assert toy_flaws.classify_response(example, response) == expected


def test_flawed_answer_rate_counts_only_distinguishable_items():
  examples = [TEXT, TEXT_SAME, MEAN, VIDEO, TEXT]
  responses = ["#13", "#7", "#6", "#10", "#99"]
  # judged: TEXT flawed, MEAN right, VIDEO flawed, TEXT other -> 2 of 4.
  rate, judged = toy_flaws.flawed_answer_rate(examples, responses)
  assert judged == 4 and rate == pytest.approx(0.5)


def test_flawed_answer_rate_edge_cases():
  rate, judged = toy_flaws.flawed_answer_rate([TEXT_SAME], ["#7"])
  assert judged == 0 and math.isnan(rate)
  with pytest.raises(ValueError, match="2 examples but 1 responses"):
    toy_flaws.flawed_answer_rate([TEXT, MEAN], ["#13"])
