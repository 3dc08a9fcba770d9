"""Issue 30 item 6 and issue 29 item 1: rewards cannot go wrong silently.

A plug-in's failure (raised, NaN, inf, 1e300, not a number) is a named error, counted per
step, fatal past reward.max_error_fraction; a reference that cannot be checked in time
is rejected when the dataset loads, naming file and line; the `datasets` reader applies
the built-in reader's type rules; e^{i pi} = -1. At most 1 verifier worker per test."""
import json
import re

import numpy as np
import pytest

from copd_jax.data import math_verifier, records, reward_fns
from copd_jax.data import verifiers as verifiers_lib
from copd_jax.data.reward_values import RewardFunctionError, check_reward_value
from copd_jax.rl import rollout

PLUGIN = """
def dispatch(response, example):
  if response == "raise":
    raise RuntimeError("bug in the plug-in")
  special = {"nan": float("nan"), "inf": float("inf"), "huge": 1e300, "text": "abc",
             "none": None, "bigint": 10 ** 400, "numeric text": "1.5"}
  if response in special:
    return special[response]
  return float(response == example.answer)
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
  (tmp_path / "my_rewards.py").write_text(PLUGIN)
  monkeypatch.syspath_prepend(str(tmp_path))
  return "my_rewards:dispatch"


def example(answer="7"):
  return math_verifier.RewardExample(capability="math", question="q", answer=answer)


# ------------------------------------------------------------- check_reward_value

@pytest.mark.parametrize("value, expected", [
    (1.0, 1.0), (0, 0.0), (True, 1.0), (np.float32(0.25), 0.25), (-3.0e38, -3.0e38)])
def test_finite_float32_numbers_are_accepted(value, expected):
  assert check_reward_value(value, "m:f") == expected


@pytest.mark.parametrize("value, message", [
    (1e300, "beyond float32's range"), (-1e39, "beyond float32's range"),
    (float("nan"), "not a finite number"), (float("-inf"), "not a finite number"),
    ("abc", "str 'abc', not a number"), ("1.5", "not a number"), (None, "NoneType"),
    (10 ** 400, "not a float"), (np.array([1.0]), "ndarray")])
def test_bad_reward_values_are_named_errors(value, message):
  with pytest.raises(RewardFunctionError, match=rf"reward function m:f returned .*{message}"):
    check_reward_value(value, "m:f")


# ------------------------------------------------- plug-in failures through the pool

@pytest.mark.parametrize("response, message", [
    ("raise", "raised RuntimeError: bug in the plug-in"),
    ("huge", "returned 1e\\+300, beyond float32's range"),
    ("inf", "returned inf, not a finite number"),
    ("nan", "returned nan, not a finite number"),
    ("text", "returned str 'abc', not a number"),
    ("numeric text", "returned str '1.5', not a number"),
    ("bigint", r"returned 10+\.\.\., which is not a float")])
def test_a_failing_plugin_stops_the_batch_naming_function_and_problem(plugin, response,
                                                                      message):
  # Before: 1e300 became inf in the float32 rewards, the rest silently 0.
  config = math_verifier.RewardConfig(fn=plugin, workers=1)
  with pytest.raises(RewardFunctionError, match=rf"reward function {plugin} {message}.*"
                     r"2 of 2 responses of this batch failed"):
    verifiers_lib.score([response, response], [example(), example("8")], config)


def test_failures_below_the_fraction_score_0_are_counted_and_the_traceback_printed_once(
    plugin, capsys, monkeypatch):
  monkeypatch.setattr("copd_jax.data.reward_values._first_traceback_printed", False)
  config = math_verifier.RewardConfig(fn=plugin, workers=1)  # max_error_fraction 1.0
  responses = ["raise", "7", "nan", "8"]
  rewards, stats = verifiers_lib.score(responses, [example()] * 4, config)
  assert rewards.tolist() == [0.0, 1.0, 0.0, 0.0] and stats.errors == 2
  first = capsys.readouterr().err
  assert first.count("Traceback (most recent call last)") == 1
  assert "my_rewards.py" in first and "bug in the plug-in" in first
  rewards, stats = verifiers_lib.score(["raise", "7"], [example()] * 2, config)
  assert stats.errors == 1 and rewards.tolist() == [0.0, 1.0]
  assert "Traceback" not in capsys.readouterr().err  # once per process
  # The same failures past a lower fraction stop the run.
  strict = math_verifier.RewardConfig(fn=plugin, workers=1, max_error_fraction=0.5)
  with pytest.raises(RewardFunctionError, match=r"2 of 4 responses .*max_error_fraction=0\.5"):
    verifiers_lib.score(responses, [example()] * 4, strict)
  rewards, stats = verifiers_lib.score(["raise", "7", "7", "7"], [example()] * 4, strict)
  assert stats.errors == 1  # 1 of 4 < 0.5: counted, not fatal


def test_plugin_errors_are_a_step_metric(plugin):
  rewards_fn = reward_fns.Rewards(math_verifier.RewardConfig(fn=plugin, workers=1))
  responses = np.array(["7", "raise", "7", "nan", "8", "7"], dtype=object)
  examples = [[example()] * 3, [example()] * 3]  # [S=2][B*G=3]
  stats = {}
  rewards = rollout.verify_local(lambda rows: list(responses[rows]), examples,
                                 np.ones((2, 3), bool), stats, rewards_fn)
  np.testing.assert_array_equal(rewards, [[1, 0, 1], [0, 0, 1]])
  assert stats["reward/errors"] == 2.0 and stats["verify/memory_exceeded"] == 0.0


# ---------------------------------------------- references that cannot be checked

def test_a_reference_that_cannot_be_checked_in_time_is_rejected_at_load(tmp_path):
  # Every comparison with 9^{9^{9^{9}}} runs for hours (sympy evaluates the power), so
  # every response to it would time out and score 0. Before: it passed the load check.
  # The run's reward limits are passed to the load (no process-wide setting).
  limits = math_verifier.RewardConfig(timeout_s=1.0, workers=1)
  path = tmp_path / "tower.jsonl"
  rows = [{"prompt": "half?", "answer": "\\frac{1}{2}"},
          {"prompt": "tower?", "answer": "9^{9^{9^{9}}}"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  expected = (f"{path}:2: field 'answer' '9^{{9^{{9^{{9}}}}}}' cannot be checked within "
              "config.reward.timeout_s=1 s")
  with pytest.raises(ValueError, match=re.escape(expected)):
    records.load_records(str(path), capability="math", reward_config=limits)
  path.write_text(json.dumps(rows[0]) + "\n")  # the good line alone loads
  assert [r.answer for r in records.load_records(str(path), capability="math",
                                                 reward_config=limits)] == [
      "\\frac{1}{2}"]


# ------------------------------------------------------- the datasets reader's types

def test_datasets_reader_rejects_a_column_mixing_strings_and_integers(tmp_path):
  # Before: datasets stored the column as JSON text, 'red' loaded as '"red"' and a correct
  # response scored 0. The built-in reader rejects this file; so does the datasets one.
  path = tmp_path / "mixed.jsonl"
  path.write_text('{"prompt": "colour?", "answer": "red", "verifier": "exact"}\n'
                  '{"prompt": "count?", "answer": 7, "verifier": "integer"}\n')
  with pytest.raises(ValueError, match=rf"{path}:2: field 'answer' must be a string"):
    records.load_records(str(path), capability="text")
  with pytest.raises(ValueError, match=rf"{path}: column 'answer' \(field 'answer'\) mixes "
                     r"JSON types .* must be a string"):
    records.load_records(str(path), capability="text", reader="datasets")
  renamed = tmp_path / "renamed.jsonl"  # the same through config.data.columns
  renamed.write_text(path.read_text().replace('"answer"', '"final"'))
  with pytest.raises(ValueError, match=r"column 'final' \(field 'answer'\) mixes JSON types"):
    records.load_records(str(renamed), capability="text", reader="datasets",
                         columns={"answer": "final"})


def test_datasets_reader_reads_valid_mixed_columns_as_the_builtin_one_does(tmp_path):
  # `id` may be a string or an integer, other columns are ignored: both readers accept
  # the file and give the same records (ids not JSON-quoted).
  path = tmp_path / "ids.jsonl"
  path.write_text('{"prompt": "a?", "answer": "red", "verifier": "exact", "id": 1, "meta": 1}\n'
                  '{"prompt": "b?", "answer": "7", "verifier": "integer", "id": "b", '
                  '"meta": {"x": [1]}}\n')
  builtin = records.load_records(str(path), capability="text")
  via_datasets = records.load_records(str(path), capability="text", reader="datasets")
  assert [r.where.split(" (id ")[1] for r in via_datasets] == ["1)", "b)"]
  strip = lambda rs: [(r.prompt, r.answer, r.verifier) for r in rs]
  assert strip(via_datasets) == strip(builtin) == [("a?", "red", "exact"), ("b?", "7", "integer")]


# --------------------------------------------------------------------- e^{i pi}

@pytest.mark.parametrize("response, reference, expected", [
    ("\\boxed{e^{i\\pi}}", "-1", 1.0),     # Euler: before, 'i' was a variable: 0
    ("\\boxed{e^{\\pi i}}", "-1", 1.0),
    ("\\boxed{i^2}", "-1", 1.0),
    ("\\boxed{e^{i\\pi}}", "1", 0.0),      # and not everything equals everything
    ("\\boxed{e^{i\\pi/2}}", "-1", 0.0),   # = i
    ("\\boxed{3i+2}", "2+3i", 1.0),
    ("\\boxed{2-3i}", "2+3i", 0.0)])
def test_the_imaginary_unit(response, reference, expected):
  assert math_verifier.math_equivalent(response, reference, timeout_s=30.0,
                                       config=math_verifier.RewardConfig(workers=1)) == expected
