"""Record datasets (JSONL / Parquet) and the record verifiers (math, choice, exact)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import paths
from copd_jax.data import (
  answers as verifiers,
  examples as examples_lib,
  math_verifier,
  records as datasets,
  toy_tasks as tasks,
  verifiers as verifiers_lib,
)
from copd_jax.data.tokenizer import ToyTokenizer

DATA = os.path.join(paths.TESTS, "fixtures", "data")
MB = 1 << 20


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


GOOD = {"prompt": "1+1?", "answer": "2", "capability": "math"}


# ----------------------------------------------------------------------------- loading

def test_jsonl_records_become_examples():
  source = datasets.RecordSource(os.path.join(DATA, "math_train.jsonl"), capability="math")
  assert len(source) == 6
  first = source[0]
  assert isinstance(first, examples_lib.Example)
  assert (first.capability, first.modality, first.verifier) == ("math", "text", "math")
  assert first.answer == "\\frac{3}{4}" and first.frames is None and first.solution == ""
  assert first.record.endswith("math_train.jsonl:1 (id m1)")
  assert source[3].verifier == "integer" and source[3].solution == "3+4=7#7"


def test_parquet_records_and_path_lists():
  source = datasets.RecordSource(os.path.join(DATA, "science_train.parquet"))
  assert [source[i].verifier for i in range(4)] == ["choice", "choice", "exact", "choice"]
  assert source[0].record.endswith("science_train.parquet row 0 (id s1)")
  both = datasets.RecordSource(",".join([os.path.join(DATA, "science_eval.parquet"),
                                         os.path.join(DATA, "science_train.parquet")]))
  assert len(both) == 6
  globbed = datasets.RecordSource(os.path.join(DATA, "science_*.parquet"))
  assert len(globbed) == 6


def test_images_and_video_frames_are_decoded_at_the_model_size():
  source = datasets.RecordSource(os.path.join(DATA, "vision.jsonl"), image_size=16, num_frames=4)
  red, blue, video = source[0], source[1], source[2]
  assert red.modality == "image" and red.frames.shape == (1, 16, 16, 3)
  np.testing.assert_allclose(red.frames[0, 8, 8], [1.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(blue.frames[0, 8, 8], [0.0, 0.0, 1.0], atol=1e-6)
  assert red.frames.min() >= 0.0 and red.frames.max() <= 1.0
  assert video.modality == "video" and video.frames.shape == (4, 16, 16, 3)
  # 3 frames padded to 4 by repeating the last; the green bar moves left to right.
  np.testing.assert_array_equal(video.frames[3], video.frames[2])
  assert video.frames[0, 8, 0, 1] > 0.9 and video.frames[2, 8, 15, 1] > 0.9
  assert video.frames[0, 8, 15, 1] < 0.1


def test_image_bytes_in_parquet(tmp_path):
  with open(os.path.join(DATA, "images", "red.png"), "rb") as f:
    png = f.read()
  path = str(tmp_path / "pics.parquet")
  pq.write_table(pa.Table.from_pylist([{"prompt": "colour?", "answer": "red",
                                         "capability": "chart", "verifier": "exact",
                                         "images": [png]}]), path)
  example = datasets.RecordSource(path, image_size=8, num_frames=2)[0]
  assert example.capability == "chart" and example.modality == "image"
  np.testing.assert_allclose(example.frames[0, 4, 4], [1.0, 0.0, 0.0], atol=1e-6)


def test_frame_sampling():
  np.testing.assert_array_equal(datasets.frame_indices(8, 4), [0, 2, 5, 7])
  np.testing.assert_array_equal(datasets.frame_indices(4, 4), [0, 1, 2, 3])
  np.testing.assert_array_equal(datasets.frame_indices(2, 4), [0, 1, 1, 1])


def test_picture_records_need_a_vision_model():
  path = os.path.join(DATA, "vision.jsonl")
  with pytest.raises(ValueError, match=r"vision.jsonl:1.*no vision tower"):
    datasets.RecordSource(path, image_size=0, num_frames=0)
  with pytest.raises(ValueError, match=r"vision.jsonl:1.*image_size and num_frames"):
    datasets.RecordSource(path)


@pytest.mark.parametrize("bad, message", [
    ({"answer": "2", "capability": "math"}, r"field 'prompt' is missing"),
    ({"prompt": "q", "capability": "math"}, r"field 'answer' is missing"),
    ({"prompt": 7, "answer": "2", "capability": "math"}, r"field 'prompt' must be a string"),
    ({"prompt": "q", "answer": 2, "capability": "math"}, r"field 'answer' must be a string"),
    ({**GOOD, "verifier": "llm_judge"}, r"verifier must be one of"),
    ({**GOOD, "verifier": "choice"}, r"'choice' answer must be one letter"),
    ({**GOOD, "verifier": "integer", "answer": "1.5"}, r"'integer' answer"),
    ({**GOOD, "capability": "Math!"}, r"field 'capability' is 'Math!'"),
    ({**GOOD, "capability": "physics"}, r"field 'capability' is 'physics'.*'math' records"),
    ({**GOOD, "images": ["missing.png"]}, r"images\[0\] is not a readable image"),
    ({**GOOD, "images": ["not_an_image.txt"]}, r"images\[0\] is not a readable image"),
    ({**GOOD, "images": "red.png"}, r"field 'images' must be a list"),
    ({**GOOD, "capability": "math", "images": [], "video_frames": [7]}, r"video_frames\[0\]"),
    ('{"prompt": "q", "answer": ', r"not a valid JSON object"),
    ('["a list"]', r"must be a JSON object"),
])
def test_malformed_jsonl_record_names_file_line_and_field(tmp_path, bad, message):
  (tmp_path / "not_an_image.txt").write_text("hello")
  path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", bad])  # blank line 2: skipped
  with pytest.raises(ValueError, match=rf"d\.jsonl:3.*{message}"):
    datasets.RecordSource(path, capability="math")


def test_builtin_capability_must_match_the_record_input(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "1",
                                             "capability": "image", "verifier": "integer"}])
  with pytest.raises(ValueError, match=r"d\.jsonl:1.*'image' record needs one image"):
    datasets.RecordSource(path)
  path = write_jsonl(tmp_path / "e.jsonl", [{**GOOD, "capability": "Math!"}])
  with pytest.raises(ValueError, match=r"e\.jsonl:1.*field 'capability' must be"):
    datasets.RecordSource(path)


def test_malformed_parquet_row_is_named(tmp_path):
  path = str(tmp_path / "d.parquet")
  pq.write_table(pa.Table.from_pylist([{**GOOD, "verifier": "math"},
                                             {**GOOD, "verifier": "choice"}]), path)
  with pytest.raises(ValueError, match=r"d\.parquet row 1.*'choice' answer"):
    datasets.RecordSource(path)


def test_missing_or_unknown_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    datasets.RecordSource(str(tmp_path / "nope.jsonl"))
  (tmp_path / "d.csv").write_text("prompt,answer\n")
  with pytest.raises(ValueError, match="unknown record file type"):
    datasets.RecordSource(str(tmp_path / "d.csv"))
  empty = write_jsonl(tmp_path / "e.jsonl", [])
  with pytest.raises(ValueError, match="no records"):
    datasets.RecordSource(empty)


# ------------------------------------------------------------------------------ Example

def test_example_domain_names_need_a_modality():
  ok = examples_lib.Example("math", "q", "\\frac{1}{2}", verifier="math", modality="text")
  assert ok.modality == "text" and ok.describe().startswith("math example")
  with pytest.raises(ValueError, match="capability"):
    examples_lib.Example("math", "q", "1")  # no modality: not a built-in capability
  with pytest.raises(ValueError, match="modality"):
    examples_lib.Example("text", "q", "1", modality="image")
  with pytest.raises(ValueError, match="verifier"):
    examples_lib.Example("math", "q", "1", verifier="judge", modality="text")
  toy = tasks.make_example("text", 0, seed=0, difficulty=0)
  assert toy.verifier == "integer" and toy.modality == "text"


def test_text_only_model_batches_have_no_frames():
  tok = ToyTokenizer()
  text = tasks.make_example("text", 0, seed=0, difficulty=0)
  batch = examples_lib.encode_prompts([text], tok, max_prompt_len=32, num_vision_tokens=0,
                               num_frames=0, image_size=0)
  assert batch.frames is None and batch.mask.sum() == 1 + len(text.question)
  image = tasks.make_example("image", 0, seed=0, difficulty=0)
  with pytest.raises(ValueError, match=r"examples\[0\].*no vision tower"):
    examples_lib.encode_prompts([image], tok, max_prompt_len=64, num_vision_tokens=0, num_frames=0,
                         image_size=0)


# ---------------------------------------------------------------------------- verifiers

@pytest.mark.parametrize("response, answer", [
    ("so the result is \\boxed{0.5}", "\\frac{1}{2}"),
    ("The final answer is $\\frac12$", "0.5"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
    ("\\boxed{1+x^2}", "x^2+1"),
    ("Answer: 12.0", "12"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
])
def test_math_equivalences(response, answer):
  assert math_verifier.math_equivalent(response, answer) == 1.0


@pytest.mark.parametrize("response, answer", [
    ("\\boxed{4}", "3"),
    ("no final answer here: 0.5", "\\frac{1}{2}"),  # needs \boxed or an answer phrase
    ("\\boxed{x^2-1}", "x^2+1"),
    ("\\boxed{}", "1"),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}"),  # unbalanced braces
])
def test_math_non_equivalences(response, answer):
  assert math_verifier.math_equivalent(response, answer) == 0.0


def test_math_timeout_scores_zero_and_the_worker_recovers():
  start = time.perf_counter()
  assert math_verifier.math_equivalent("\\boxed{9^{9^{9^{9}}}}", "7", timeout_s=0.5) == 0.0
  # Bounded (the tower never finishes on its own); generous for a loaded 2-core machine,
  # where replacing the killed worker (a sympy import) alone can take seconds.
  assert time.perf_counter() - start < 60.0
  assert math_verifier.math_equivalent("\\boxed{7}", "7") == 1.0  # a fresh worker


def test_model_text_is_never_evaluated(tmp_path):
  marker = tmp_path / "pwned"
  payloads = [f"__import__('os').system('touch {marker}')",
              f"\\text{{__import__('os').system('touch {marker}')}}",
              f"(lambda: __import__('os').system('touch {marker}'))()"]
  for payload in payloads:
    for text in (f"\\boxed{{{payload}}}", f"The answer is {payload}"):
      assert math_verifier.math_equivalent(text, "0") == 0.0
      assert verifiers.exact_reward(text, "0") == 0.0
      assert verifiers.extract_choice(text) is None
  assert not marker.exists()


def test_worker_guard_lets_only_number_literals_reach_sympy_parse_expr():
  code = ("import sympy\n"
          "from copd_jax.data import math_verifier\n"
          "math_verifier._install_parse_expr_guard()\n"
          "assert sympy.Number('12') == 12 and float(sympy.Number('0.5')) == 0.5\n"
          "for text in (\"__import__('os')\", 'x+1', '1e5', ''):\n"
          "  try:\n"
          "    sympy.sympify(text)\n"
          "  except Exception:\n"
          "    continue\n"
          "  raise SystemExit('parsed ' + repr(text))\n"
          "print('guarded')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "guarded" in out.stdout, out.stderr


@pytest.mark.parametrize("response, letter", [
    ("(B)", "B"), ("Answer: B", "B"), ("**B**", "B"), ("The answer is (C).", "C"),
    ("I think it is A, no wait.\nFinal answer: **D**", "D"), ("\\boxed{E}", "E"),
    ("\\boxed{\\text{J}}", "J"), ("answer: b", None), ("The answer is Bob", None),
    ("nothing", None), ("K", None), ("", None),
])
def test_choice_letters(response, letter):
  assert verifiers.extract_choice(response) == letter
  if letter:
    assert verifiers.choice_reward(response, letter) == 1.0
    assert verifiers.choice_reward(response, f"({letter})") == 1.0


def test_exact_match_normalises_case_and_whitespace():
  assert verifiers.exact_reward("The answer is  MARS.", "mars") == 1.0
  assert verifiers.exact_reward("thinking...\n  Mars  ", "Mars") == 1.0
  assert verifiers.exact_reward("\\boxed{new  york}", "New York") == 1.0
  assert verifiers.exact_reward("The answer is Venus", "Mars") == 0.0


def test_adversarial_megabyte_outputs_are_bounded():
  nasty = ["\\boxed{" * (MB // 7), "{" * MB + "}", "A" * MB, "answer:" * (MB // 7),
           "(" * MB, "\\boxed{1}" + "x" * MB, "9" * MB, "\\frac{" * (MB // 6) + "1"]
  for response in nasty:
    start = time.perf_counter()
    rewards = [math_verifier.math_equivalent(response, "1", timeout_s=2.0),
               verifiers.choice_reward(response, "A"), verifiers.exact_reward(response, "1")]
    assert time.perf_counter() - start < 60.0  # bounded; generous under load (see above)
    assert all(r in (0.0, 1.0) for r in rewards)


def test_rewards_for_dispatches_on_each_example():
  examples = [
      examples_lib.Example("math", "q", "\\frac{1}{2}", verifier="math", modality="text"),
      examples_lib.Example("science", "q", "B", verifier="choice", modality="text"),
      examples_lib.Example("science", "q", "Mars", verifier="exact", modality="text"),
      tasks.make_example("text", 0, seed=0, difficulty=0),
  ]
  good = ["\\boxed{0.5}", "Answer: (B)", "mars", examples[3].solution]
  bad = ["\\boxed{2}", "Answer: C", "venus", "#999"]
  np.testing.assert_array_equal(verifiers_lib.rewards_for(good, examples), [1, 1, 1, 1])
  np.testing.assert_array_equal(verifiers_lib.rewards_for(bad, examples), [0, 0, 0, 0])
  assert verifiers_lib.rewards_for(good, examples).dtype == np.float32
  with pytest.raises(ValueError, match="same length"):
    verifiers_lib.rewards_for(good[:2], examples)
