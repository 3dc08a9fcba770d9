"""The math verifier and reward plug-ins under bad answers (issue 13 items 1, 2, 4, 5; issue 15.8).

Each case reproduces a failure found by trying the project with bad input and injected faults,
and checks the behaviour that replaced it. Expected values are written out by hand."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import paths
import process_checks
from copd_jax import config_lib, default_config
from copd_jax.data import (
  answers as verifiers,
  examples as examples_lib,
  math_verifier,
  verifiers as verifiers_lib,
)

REPO = paths.REPO


def math_example(answer):
  return examples_lib.Example("math", "q", answer, verifier="math", modality="text")


# ------------------------------------------------------- 13.1 symbolic answers scored 0

@pytest.mark.parametrize("response, answer", [
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{x(x+3)}", "x^2+3x"),
    ("\\boxed{\\sin^2x+\\cos^2x}", "1"),
    ("\\boxed{\\frac{x^2-1}{x-1}}", "x+1"),
    ("\\boxed{2\\sin x\\cos x}", "\\sin 2x"),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}"),
])
def test_symbolic_equivalents_score_one(response, answer):
  assert math_verifier.math_equivalent(response, answer) == 1.0


@pytest.mark.parametrize("response, answer", [
    ("\\boxed{x^2+2x}", "(x+1)^2"), ("\\boxed{x(x-3)}", "x^2+3x"),
    ("\\boxed{\\sin^2x-\\cos^2x}", "1"),
])
def test_symbolic_non_equivalents_score_zero(response, answer):
  assert math_verifier.math_equivalent(response, answer) == 0.0


def test_no_module_is_imported_after_the_guard():
  """The guard is installed after everything the comparisons import: checking symbolic
  answers imports nothing new in the worker."""
  for response, answer in [("\\boxed{x^2+2x+1}", "(x+1)^2"), ("\\boxed{\\sin^2x+\\cos^2x}", "1"),
                           ("\\boxed{(0,1]}", "(0,1]"), ("\\boxed{\\int_0^1 x dx}", "1/2")]:
    math_verifier.math_equivalent(response, answer)
  pool = verifiers_lib.shared_pool(math_verifier.RewardConfig())
  late, _ = pool.run([("late_imports",)] * pool.size, timeout_s=30)
  assert late == [[]] * pool.size


def test_guard_still_refuses_model_text_after_the_fix():
  code = textwrap.dedent("""
      import sympy
      from copd_jax.data import math_verifier
      math_verifier._install_parse_expr_guard()
      assert sympy.Number('12') == 12
      import sympy.physics.units  # a module's own import-time constants are allowed
      for text in ("__import__('os')", 'x+1', 'yotta'):
        try:
          sympy.sympify(text)
        except Exception:
          continue
        raise SystemExit('parsed ' + repr(text))
      print('guarded')
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=1800, cwd=REPO)  # a safety net, generous under load
  assert out.returncode == 0 and "guarded" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------- 13.2 the answer phrase

@pytest.mark.parametrize("response", [
    "The answer is 7.", "The answer is: 7", "So the final answer is **7**.",
    "Answer: $7$", "The answer is 7. I checked it twice.", "The answer is\n\n7\n",
])
def test_answer_phrase_in_ordinary_text(response):
  assert verifiers.final_answer_text(response) == "7"
  assert math_verifier.math_equivalent(response, "7") == 1.0
  assert verifiers.exact_reward(response, "7") == 1.0


def test_answer_phrase_keeps_decimals_and_rejects_wrong_answers():
  assert verifiers.final_answer_text("The answer is 3.5.") == "3.5"
  assert math_verifier.math_equivalent("The answer is: 3.5.", "7/2") == 1.0
  assert math_verifier.math_equivalent("The answer is 8.", "7") == 0.0


# ----------------------------------------------- 13.4 time limit in config, step budget

HANG = "\\boxed{9^{9^{9^{9}}}}"  # sympy computes this power for hours


def test_per_answer_limit_comes_from_the_config():
  config = verifiers_lib.RewardConfig(timeout_s=0.5, workers=1)
  rewards, stats = verifiers_lib.score([HANG, "\\boxed{7}"], [math_example("7")] * 2, config)
  np.testing.assert_array_equal(rewards, [0.0, 1.0])
  assert (stats.timeouts, stats.over_budget) == (1, 0)


def test_step_budget_bounds_a_batch_of_hanging_answers():
  # Each hanging answer has a 100 s limit; the batch's 2 s budget ends all of them.
  config = verifiers_lib.RewardConfig(timeout_s=100.0, step_budget_s=2.0, workers=2)
  hanging = [f"\\boxed{{9^{{9^{{9^{{{k}}}}}}}}}" for k in range(9, 13)]
  rewards, stats = verifiers_lib.score(hanging, [math_example("7")] * 4, config)
  np.testing.assert_array_equal(rewards, [0, 0, 0, 0])
  assert stats.over_budget == 4 and stats.timeouts == 0
  # The pool recovers: the next batch is scored normally.
  rewards, _ = verifiers_lib.score(["\\boxed{7}"], [math_example("7")], config)
  assert rewards.tolist() == [1.0]


@pytest.mark.parametrize("field, value", [("timeout_s", 0.0), ("step_budget_s", -1.0),
                                          ("workers", 0), ("timeout_s", float("inf"))])
def test_reward_config_fields_are_checked(field, value):
  cfg = default_config.get("copd", "micro")
  cfg.reward[field] = value
  with pytest.raises(ValueError, match=rf"config\.reward\.{field}"):
    config_lib.validate_config(cfg)


# ------------------------------------------------------ 13.5 worker dies with its parent

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_dies_when_its_parent_is_killed():
  code = textwrap.dedent("""
      import threading, time
      from copd_jax.data import math_verifier
      pool = math_verifier.VerifierPool(1)
      threading.Thread(target=pool.run, args=([("math", "7", "9^{9^{9^{9}}}")], 3600.0),
                       daemon=True).start()
      while not pool._workers or pool._workers[0].job is None:  # busy on the hanging answer
        time.sleep(0.05)
      print(pool.pids()[0], flush=True)
      time.sleep(3600)
  """)
  parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
  worker = int(parent.stdout.readline())
  assert process_checks.alive(worker)
  parent.kill()  # SIGKILL: no handler, no atexit
  parent.wait()
  assert not process_checks.outlives(worker, 60), \
      "the verifier worker outlived its SIGKILLed parent"


# ------------------------------------------------------------ 15.8 reward plug-ins

PLUGIN = """
import os

def exact(response, example):
  return 1.0 if response.strip() == example.answer else 0.0

def pid(response, example):
  return float(os.getpid())

def hang(response, example):
  while True:
    pass

def broken(response, example):
  raise RuntimeError('bug in the plug-in')

def nan(response, example):
  return float('nan')
"""


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
  (tmp_path / "my_rewards.py").write_text(PLUGIN)
  monkeypatch.syspath_prepend(str(tmp_path))
  return "my_rewards"


def test_plugin_reward_runs_in_a_worker_with_the_time_limit(plugin_module):
  examples = [math_example("7"), math_example("8")]
  config = verifiers_lib.RewardConfig(fn=f"{plugin_module}:exact", workers=1)
  np.testing.assert_array_equal(verifiers_lib.rewards_for(["7", "7"], examples, config), [1, 0])
  pids = verifiers_lib.rewards_for(["a"], examples[:1],
                               verifiers_lib.RewardConfig(fn=f"{plugin_module}:pid", workers=1))
  assert pids[0] not in (0.0, float(os.getpid()))  # another process
  rewards, stats = verifiers_lib.score(["7"], examples[:1], verifiers_lib.RewardConfig(
      fn=f"{plugin_module}:hang", timeout_s=0.5, workers=1))
  assert rewards.tolist() == [0.0] and stats.timeouts == 1
  for fn in ("broken", "nan"):  # a failing or non-finite plug-in result is an error
    # (issue 29: loud, not a silent 0; tests/data/test_reward_faults.py has the details)
    with pytest.raises(verifiers_lib.RewardFunctionError, match=rf"{plugin_module}:{fn}"):
      verifiers_lib.rewards_for(["7"], examples[:1], verifiers_lib.RewardConfig(
          fn=f"{plugin_module}:{fn}", workers=1))


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "module:function"), ("no_such_module_xyz:f", "cannot import"),
    ("os:no_such_function", "no callable"),
])
def test_bad_plugin_spec_names_the_field(spec, message):
  cfg = default_config.get("copd", "micro")
  cfg.reward.fn = spec
  with pytest.raises(ValueError, match=rf"config\.reward\.fn.*{message}"):
    config_lib.validate_config(cfg)
