"""Task arithmetic over stacked experts (experiments/merge_experts.py) by hand."""
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import paths  # noqa: E402  (tests/paths.py)
sys.path.insert(0, paths.EXPERIMENTS)
import merge_experts  # noqa: E402

from copd_jax.models import stacked as stacked_lib  # noqa: E402


def test_task_arithmetic_by_hand():
  base = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}
  experts = {"w": jnp.array([[2.0, 2.0], [1.0, 5.0], [4.0, 2.0]]), "b": jnp.array([0.5, 1.5, 2.5])}
  # Task vectors: w (1, 0), (0, 3), (3, 0) -> sum (4, 3); b 0, 1, 2 -> sum 3.
  out = merge_experts.task_arithmetic(base, experts, [1.0, 0.5])
  np.testing.assert_allclose(out["w"], [[5.0, 5.0], [3.0, 3.5]])
  np.testing.assert_allclose(out["b"], [3.5, 2.0])
  # Scale 1/E is the uniform weight average CoPD merges with.
  uniform = merge_experts.task_arithmetic(base, experts, [1 / 3])
  merged = stacked_lib.merge(experts)
  np.testing.assert_allclose(uniform["w"][0], merged["w"], rtol=1e-6)
  np.testing.assert_allclose(uniform["b"][0], merged["b"], rtol=1e-6)


def test_scales_and_choice():
  assert merge_experts.scales(3) == pytest.approx((1 / 3, 1 / 2, 2 / 3, 5 / 6, 1.0))
  assert merge_experts.scales(2)[0] == 0.5 and merge_experts.scales(2)[-1] == 1.0
  assert merge_experts.choose({"a": 0.7, "b": 0.8, "c": 0.6}) == "b"
  assert merge_experts.choose({"a": 0.8, "b": 0.8, "c": 0.6}) == "a"  # tie: the earlier


def test_ties_by_hand():
  # One tensor of 5 entries, 3 experts; base 0. Density 0.4 keeps each task vector's 2
  # largest magnitudes:
  #   e0 [ 4, -1,  0,  3,  0.5] -> [ 4,  0, 0,  3, 0]
  #   e1 [-2,  5,  1,  0,  0  ] -> [-2,  5, 0,  0, 0]
  #   e2 [ 1,  0, -6,  2,  0  ] -> [ 0,  0, -6, 2, 0]
  # Elected sign = sign of the column sums (2, 5, -6, 5, 0) -> (+, +, -, +, 0); the mean
  # of the kept entries that agree: (4, 5, -6, (3 + 2) / 2, 0).
  base = {"w": jnp.zeros(5)}
  experts = {"w": jnp.array([[4.0, -1.0, 0.0, 3.0, 0.5], [-2.0, 5.0, 1.0, 0.0, 0.0],
                             [1.0, 0.0, -6.0, 2.0, 0.0]])}
  out = merge_experts.ties(base, experts, [1.0, 0.5], density=0.4)
  np.testing.assert_allclose(out["w"][0], [4.0, 5.0, -6.0, 2.5, 0.0])
  np.testing.assert_allclose(out["w"][1], [2.0, 2.5, -3.0, 1.25, 0.0])
  names, params = merge_experts.candidates(base, experts, 3)
  assert len(names) == params["w"].shape[0] == 5 + len(merge_experts.TIES_SCALES)
  assert names[0].startswith("task arithmetic") and names[-1].startswith("TIES")
