"""pass@k (issue 15.9): the unbiased estimator against hand computations, and its place in
the evaluation (per capability and per branch, next to greedy accuracy)."""
import math

import jax
import numpy as np
import pytest

from copd_jax.config_lib import spec_of
from copd_jax import config_lib, default_config, policy_setup
from copd_jax.data import verifiers
from copd_jax.models import decoder as model_lib, stacked as experts
from copd_jax.rl import evaluation


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 2, 1 - 3 / 10),     # C(3,2) = 3, C(5,2) = 10
    (4, 1, 2, 1 - 3 / 6),      # C(3,2) = 3, C(4,2) = 6
    (10, 3, 1, 3 / 10),        # pass@1 is the fraction correct
    (10, 0, 3, 0.0),           # nothing correct
    (4, 4, 1, 1.0),            # everything correct
    (3, 1, 3, 1.0),            # n - c < k: every draw of 3 holds the correct one
    (8, 2, 4, 1 - 15 / 70),    # C(6,4) = 15, C(8,4) = 70
])
def test_estimator_matches_hand_computation(n, c, k, expected):
  assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_estimator_equals_the_binomial_definition_on_a_grid():
  for n in range(1, 13):
    for c in range(n + 1):
      for k in range(1, n + 1):
        definition = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert evaluation.pass_at_k(n, c, k) == pytest.approx(definition, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_estimator_rejects_impossible_counts(n, c, k):
  with pytest.raises(ValueError, match="pass@k needs"):
    evaluation.pass_at_k(n, c, k)


def test_mean_over_examples_per_branch():
  counts = np.array([[1, 0], [2, 2]])  # branch 0: 1 and 0 of 2 correct; branch 1: all
  np.testing.assert_allclose(evaluation.mean_pass_at_k(counts, 2, 1), [0.25, 1.0])
  np.testing.assert_allclose(evaluation.mean_pass_at_k(counts, 2, 2), [0.5, 1.0])


def test_evaluation_reports_pass_at_k_per_capability_and_branch(monkeypatch):
  cfg = default_config.get("copd", "micro")
  setup = policy_setup.build_setup(spec_of(cfg))
  params = model_lib.init_params(setup.model_cfg, jax.random.key(0))
  stacked = experts.broadcast_params(params, 2)
  eval_sets = {c: s[:3] for c, s in policy_setup.held_out_sets(spec_of(cfg), setup).items()
               if c in ("text", "image")}

  # Rows arrive example-major (the n samples of example 0, then of example 1, ...): the
  # first sample of every example is correct, the others wrong -> c = 1 of n = 4.
  def one_in_four(responses, examples, *args, **kwargs):
    return np.array([1.0 if i % 4 == 0 else 0.0 for i in range(len(responses))], np.float32)
  monkeypatch.setattr(verifiers, "rewards_for", one_in_four)

  from copd_jax.rl import methods
  metrics = evaluation.evaluate_stacked(stacked, setup, eval_sets,
                                        run=methods.run_sharding(spec_of(cfg), setup.model_cfg),
                                        max_new_tokens=4,
                                        batch_size=8, pass_samples=4, pass_k=(1, 2, 4))
  for cap in ("text", "image", "overall"):
    np.testing.assert_allclose(metrics[f"pass@1/{cap}"], [0.25, 0.25])
    np.testing.assert_allclose(metrics[f"pass@2/{cap}"], [0.5, 0.5])   # 1 - C(3,2)/C(4,2)
    np.testing.assert_allclose(metrics[f"pass@4/{cap}"], [1.0, 1.0])
  # Greedy accuracy sits next to it: 3 examples, the first scored correct -> 1/3.
  np.testing.assert_allclose(metrics["accuracy/text"], [1 / 3, 1 / 3], rtol=1e-6)


@pytest.mark.parametrize("samples, ks, message", [
    (4, (1, 8), r"config\.eval\.pass_k must not exceed eval\.pass_samples=4"),
    (4, (0,), r"config\.eval\.pass_k must hold positive integers"),
    (-1, (1,), r"config\.eval\.pass_samples must be a non-negative integer"),
])
def test_pass_at_k_config_is_checked(samples, ks, message):
  cfg = default_config.get("base", "micro")
  cfg.eval.pass_samples, cfg.eval.pass_k = samples, ks
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(cfg)
