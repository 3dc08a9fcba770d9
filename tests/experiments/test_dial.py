"""experiments/dial.py: the divergence measure and the report, on hand-built inputs."""
import argparse
import os
import sys

import numpy as np
import pytest

import paths

sys.path.insert(0, paths.EXPERIMENTS)
import dial  # noqa: E402


def test_symmetric_kl_by_hand():
  # Row 0: p = (0.5, 0.5), q = (0.9, 0.1) at one weighted position, and an unweighted one.
  # KL(p||q) + KL(q||p) = sum (p - q) (log p - log q)
  #   = (0.5-0.9)(ln 0.5 - ln 0.9) + (0.5-0.1)(ln 0.5 - ln 0.1) = 0.4*ln(1.8) + 0.4*ln(5).
  p = np.log(np.array([[[0.5, 0.5], [0.2, 0.8]]]))
  q = np.log(np.array([[[0.9, 0.1], [0.7, 0.3]]]))
  weights = np.array([[1.0, 0.0]])
  totals, counts = dial.symmetric_kl(p, q, weights)
  assert counts.tolist() == [1.0]
  np.testing.assert_allclose(totals, [0.4 * np.log(1.8) + 0.4 * np.log(5.0)], rtol=1e-12)
  same, _ = dial.symmetric_kl(p, p, np.ones((1, 2)))
  assert same.tolist() == [0.0]


def write_run(root, run, rewards):
  os.makedirs(os.path.join(root, run), exist_ok=True)
  np.savez(os.path.join(root, run, "eval_rewards.npz"), **rewards)
  with open(os.path.join(root, run, "summary.json"), "w") as f:
    f.write("{}")


def test_report_gap_and_differences_by_hand(tmp_path):
  # Two seeds, 4 items per family: experts right on all their own items, the merge on
  # half, CoPD on three quarters, MOPD one item below the experts per family.
  args = argparse.Namespace(runs=str(tmp_path / "runs"), out=str(tmp_path / "out"),
                            eval_examples=4)
  ones, half, threeq = np.ones(4), np.array([1, 1, 0, 0.]), np.array([1, 1, 1, 0.])
  for seed in (0, 1):
    root = os.path.join(args.runs, dial.level_name(1.0), f"seed{seed}")
    write_run(root, "experts", {f"branch/{c}/{d}": ones if c == d else 0 * ones
                                for c in dial.CAPS for d in dial.CAPS})
    write_run(root, "merged_experts", {f"merged/{c}": half for c in dial.CAPS})
    write_run(root, "copd", {**{f"merged/{c}": threeq for c in dial.CAPS},
                             **{f"branch/{c}/{d}": ones if c == d else half
                                for c in dial.CAPS for d in dial.CAPS}})
    write_run(root, "mopd", {f"branch/student/{c}": threeq for c in dial.CAPS})
    if seed == 0:  # the opt-in variant finished on one seed only
      write_run(root, "copd_opd_heavy", {f"merged/{c}": ones for c in dial.CAPS})
    with open(os.path.join(root, "experts", "divergence.json"), "w") as f:
      f.write('{"sym_kl": %s}' % (0.2 + seed))
  entry = dial.level_report(1.0, [0, 1], args)
  assert entry["seeds"] == [0, 1]
  assert entry["merged_experts_own_gap_points"]["mean"] == pytest.approx(50.0)
  assert entry["copd_minus_merged_experts"][0] == pytest.approx(25.0)
  assert entry["mopd_minus_experts"][0] == pytest.approx(-25.0)
  assert entry["expert_divergence_sym_kl"] == pytest.approx(0.7)
  low, high = entry["merged_experts_own_gap_points"]["ci95"]
  assert low <= 50.0 <= high
  assert entry["copd_minus_merged_experts_detail"]["per_seed"] == {"0": 25.0, "1": 25.0}
  assert entry["copd_minus_mopd"][0] == pytest.approx(0.0)
  # Each branch on the other family's items: the experts' 0, CoPD's branches half.
  assert entry["accuracy_points"]["Experts (other family)"]["overall"]["mean"] == 0.0
  assert entry["accuracy_points"]["CoPD branches (other family)"]["overall"]["mean"] == 50.0
  assert "Mixed RLVR" not in entry["accuracy_points"]  # not run: left out, not zero
  assert entry["copd_minus_mixed_rlvr"] is None
  # The variant pairs on the seed it finished: merged 1 against the merge's 1/2, CoPD's 3/4.
  assert entry["copd_opd_heavy_minus_merged_experts"][0] == pytest.approx(50.0)
  assert entry["copd_opd_heavy_minus_copd"][0] == pytest.approx(25.0)
  assert entry["accuracy_points"]["CoPD 1:2 (merged)"]["seeds"] == [0]
  # A level with no finished run reports nothing rather than failing.
  empty = dial.level_report(0.0, [0, 1], args)
  assert empty["merged_experts_own_gap_points"] is None and empty["seeds"] == []
