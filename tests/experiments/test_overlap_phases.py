"""experiments/overlap_phases.py: per-step overlap changes split by phase, by hand."""
import os
import sys

import numpy as np
import pytest

import paths

sys.path.insert(0, paths.EXPERIMENTS)
import overlap_phases  # noqa: E402

KEY = overlap_phases.OVERLAP_KEYS["between branches (all pairs)"]


def records(overlaps: dict, weights: dict) -> list[dict]:
  """metrics.jsonl-like records: overlap and OPD weight logged as separate lines."""
  recs = [{"step": s, overlap_phases.OPD_WEIGHT_KEY: w} for s, w in weights.items()]
  recs += [{"step": s, KEY: o} for s, o in overlaps.items()]
  return recs


def test_changes_are_split_by_the_phase_of_the_step_that_made_them():
  # Steps 1, 2 are RL (weight 0), 3 is OPD (weight 1), 4 RL. Overlap after each step:
  # 1.0 -> 0.9 -> 0.7 -> 0.8 -> 0.6. RL changes: -0.1, -0.2, -0.2; OPD change: +0.1.
  recs = records({0: 1.0, 1: 0.9, 2: 0.7, 3: 0.8, 4: 0.6}, {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0})
  steps, overlap, is_opd = overlap_phases.overlap_and_phase(recs, KEY)
  np.testing.assert_array_equal(steps, [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(is_opd, [False, False, False, True, False])
  rl, opd = overlap_phases.changes_by_phase(steps, overlap, is_opd)
  np.testing.assert_allclose(rl, [-0.1, -0.2, -0.2])
  np.testing.assert_allclose(opd, [0.1])


def test_a_gap_in_the_measurements_drops_the_change_across_it():
  # Step 2 was not measured: the change 1 -> 3 spans two steps and is no step's change.
  recs = records({0: 1.0, 1: 0.9, 3: 0.5, 4: 0.7}, {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.5})
  rl, opd = overlap_phases.changes_by_phase(*overlap_phases.overlap_and_phase(recs, KEY))
  np.testing.assert_allclose(rl, [-0.1])
  np.testing.assert_allclose(opd, [0.2])


def test_a_measured_step_without_an_opd_weight_is_an_error():
  with pytest.raises(ValueError, match="no train/opd_weight"):
    overlap_phases.overlap_and_phase(records({0: 1.0, 1: 0.9}, {}), KEY)


def test_summary_means_and_difference_by_hand():
  # Two seeds, same schedule (RL, RL, OPD). Seed 0 changes: RL -0.1, -0.3; OPD +0.2.
  # Seed 1: RL 0.0, -0.2; OPD +0.4. Mean RL change -0.15, OPD +0.3, OPD - RL = 0.45.
  weights = {1: 0.0, 2: 0.0, 3: 1.0}
  seed0 = records({0: 1.0, 1: 0.9, 2: 0.6, 3: 0.8}, weights)
  seed1 = records({0: 1.0, 1: 1.0, 2: 0.8, 3: 1.2}, weights)
  out = overlap_phases.summarize([seed0, seed1])["between branches (all pairs)"]
  assert out["rl_step_change"]["mean"] == pytest.approx(-0.15)
  assert out["opd_step_change"]["mean"] == pytest.approx(0.3)
  assert out["opd_minus_rl"]["mean"] == pytest.approx(0.45)
  assert out["steps_per_seed"] == {"rl": 2, "opd": 1}
  # The interval by hand (experiments/stats.py): OPD is one step per seed, [0.2, 0.4]:
  # variance 0.02 / 2 = 0.01 with 1 df. RL [[-0.1, -0.3], [0.0, -0.2]] has no residual:
  # seed level MS_seed / 4 = 2 * 2 * 0.05^2 / 4 = 0.0025 (1 df), item level
  # MS_item / 4 = 2 * 2 * 0.1^2 / 4 = 0.01 (1 df). Every part has 1 df, so the
  # half-width is t_1 * sqrt(0.01 + 0.0025 + 0.01) = 12.706 * 0.15.
  half = 12.7062047 * 0.15
  low, high = out["opd_minus_rl"]["ci95"]
  assert low == pytest.approx(round(0.45 - half, 4)) and high == pytest.approx(round(0.45 + half, 4))


def test_changes_by_place_within_the_phase_by_hand():
  # Phases RL RL OPD OPD RL: places RL 1, RL 2, OPD 1, OPD 2, RL 1.
  # Overlap 1.0 -> 0.9 -> 0.7 -> 0.8 -> 0.85 -> 0.75.
  weights = {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 0.0}
  recs = records({0: 1.0, 1: 0.9, 2: 0.7, 3: 0.8, 4: 0.85, 5: 0.75}, weights)
  steps, overlap, is_opd = overlap_phases.overlap_and_phase(recs, KEY)
  assert overlap_phases.phase_positions(is_opd) == ["", "RL 1", "RL 2", "OPD 1", "OPD 2", "RL 1"]
  got = overlap_phases.changes_by_position(steps, overlap, is_opd)
  assert set(got) == {"RL 1", "RL 2", "OPD 1", "OPD 2"}
  np.testing.assert_allclose(got["RL 1"], [-0.1, -0.1])
  np.testing.assert_allclose(got["RL 2"], [-0.2])
  np.testing.assert_allclose(got["OPD 1"], [0.1])
  np.testing.assert_allclose(got["OPD 2"], [0.05])
  place = overlap_phases.summarize([recs])["between branches (all pairs)"][
      "change_by_place_in_phase"]
  assert place["RL 1"]["mean"] == pytest.approx(-0.1)
  assert place["OPD 2"]["mean"] == pytest.approx(0.05)


def test_the_place_within_a_phase_needs_every_step_measured():
  recs = records({0: 1.0, 1: 0.9, 3: 0.5, 4: 0.7}, {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.5})
  with pytest.raises(ValueError, match="diagnostics_every=1"):
    overlap_phases.changes_by_position(*overlap_phases.overlap_and_phase(recs, KEY))
  # The phase means still use the changes between consecutive measurements.
  out = overlap_phases.summarize([recs])["between branches (all pairs)"]
  assert out["rl_step_change"]["mean"] == pytest.approx(-0.1)
  assert out["opd_step_change"]["mean"] == pytest.approx(0.2)
  assert out["change_by_place_in_phase"] == {}


def test_symmetric_kl_with_the_base_is_the_mean_over_branches():
  # KL with the base per branch at steps 0, 1 (RL), 2 (OPD): the mean over the three
  # branches is 0, 0.3, 0.2, so the RL step raises it by 0.3 and the OPD step lowers it 0.1.
  key = overlap_phases.SYM_KL_KEYS["symmetric KL of branches with the base"]
  per_branch = {0: (0.0, 0.0, 0.0), 1: (0.3, 0.6, 0.0), 2: (0.1, 0.2, 0.3)}
  recs = [{"step": 1, overlap_phases.OPD_WEIGHT_KEY: 0.0},
          {"step": 2, overlap_phases.OPD_WEIGHT_KEY: 1.0}]
  recs += [{"step": s, **dict(zip(key, v))} for s, v in per_branch.items()]
  recs.append({"step": 3, key[0]: 9.0})  # a step missing two branches: not a measurement
  steps, kl, is_opd = overlap_phases.overlap_and_phase(recs, key)
  np.testing.assert_array_equal(steps, [0, 1, 2])
  np.testing.assert_allclose(kl, [0.0, 0.3, 0.2])
  rl, opd = overlap_phases.changes_by_phase(steps, kl, is_opd)
  np.testing.assert_allclose(rl, [0.3])
  np.testing.assert_allclose(opd, [-0.1])
