"""experiments/scale_branches.py: the report's maths on hand-computed cases, the shared
runs of equal topologies, and --quick end to end."""
import json
import os
import sys

import numpy as np
import pytest

import paths

sys.path.insert(0, paths.EXPERIMENTS)
import scale_branches  # noqa: E402


def test_growth_exponent_recovers_known_power_laws():
  ns = [3, 6, 12]
  assert scale_branches.growth_exponent(ns, [2 * n ** 1.5 for n in ns]) == pytest.approx(1.5)
  assert scale_branches.growth_exponent(ns, [0.7 * n for n in ns]) == pytest.approx(1.0)
  # By hand, a = ln 2, b = ln 5: x = (0, a, 2a), y = (b, b, b + 2a); xbar = a,
  # ybar = b + 2a/3; slope = ((-a)(-2a/3) + 0 + a(4a/3)) / (a^2 + 0 + a^2) = 1.
  assert scale_branches.growth_exponent([1, 2, 4], [5, 5, 20]) == pytest.approx(1.0)
  assert scale_branches.growth_exponent([3, 6, 12], [1.0, None, None]) is None


def test_merged_minus_experts_one_seed_is_the_items_t_interval_by_hand():
  # Differences merged - expert over the items of both capabilities:
  # a: (1,0,1,1) - (1,1,1,0) = (0,-1,0,1); b: (0,0,1,1) - (0,1,1,1) = (0,-1,0,0).
  # mean -1/8; sum of squared deviations 2(7/8)^2 + (9/8)^2 + 5(1/8)^2 = 2.875;
  # se = sqrt(2.875 / 7 / 8) = 0.2265822; t(0.975, 7) = 2.3646243; half = 0.5357800.
  merged = {"a": np.array([[1, 0, 1, 1]]), "b": np.array([[0, 0, 1, 1]])}
  experts = {"a": np.array([[1, 1, 1, 0]]), "b": np.array([[0, 1, 1, 1]])}
  out = scale_branches.merged_minus_experts(merged, experts, ("a", "b"))
  np.testing.assert_allclose(out["points"], [-12.5, -12.5 - 53.578, -12.5 + 53.578], atol=0.01)
  assert out["per_capability"]["b"][0] == -25.0
  assert out["per_capability"]["a"][0] == 0.0


def test_merged_minus_experts_two_seeds_has_the_seed_level_part_by_hand():
  # d = merged - expert = [[1, 0], [0, 0]] (seed x item). grand mean 1/4; MS_seed =
  # 2 * ((1/2 - 1/4)^2 + (0 - 1/4)^2) / 1 = 1/4; MS_item = 1/4; MS_residual = 1/4, so the
  # item part is max(0, 1/4 - 1/4) = 0 and the seed part 1/4 / (2 * 2) = 1/16 with 1 df:
  # half-width = t(0.975, 1) * 1/4 = 12.7062047 / 4 = 3.1765512.
  merged = {"a": np.array([[1, 0], [0, 1]])}
  experts = {"a": np.array([[0, 0], [0, 1]])}
  out = scale_branches.merged_minus_experts(merged, experts, ("a",))
  np.testing.assert_allclose(out["points"], [25.0, 25.0 - 317.655, 25.0 + 317.655], atol=0.01)


def test_topologies_with_the_same_teacher_matrix_share_a_run():
  topologies = ("hub", "full", "ring")
  assert [scale_branches.topology_run(2, t, topologies) for t in topologies] == ["hub"] * 3
  assert [scale_branches.topology_run(3, t, topologies) for t in topologies] == [
      "hub", "full", "full"]
  assert [scale_branches.topology_run(6, t, topologies) for t in topologies] == list(topologies)


def test_opd_step_seconds_skips_rl_steps_and_the_compiling_first_opd_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = [
      {"step": 0, "train/opd_weight": 0.0, "train/time/sample_s": 9, "train/time/update_s": 9},
      {"step": 1, "train/opd_weight": 1.0, "train/time/sample_s": 50, "train/time/update_s": 50},
      {"step": 2, "train/opd_weight": 1.0, "train/time/sample_s": 1, "train/time/verify_s": 0.5,
       "train/time/update_s": 2},
      {"step": 3, "train/opd_weight": 1.0, "train/time/sample_s": 1, "train/time/update_s": 4},
      {"step": 4, "train/opd_weight": 1.0, "train/time/sample_s": 2, "train/time/update_s": 5},
      {"step": 5, "eval/accuracy": 0.5}]
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  # OPD steps 2, 3, 4 after the first: 3.5, 5, 7 s -> median 5.
  assert scale_branches.opd_step_seconds(str(path)) == 5.0


def test_quick_study_writes_the_report(tmp_path):
  runs, out = tmp_path / "runs", tmp_path / "out"
  report = scale_branches.main(["--quick", "--seeds", "0", "--runs", str(runs),
                                "--out", str(out)])
  with open(out / "scale_branches.json") as f:
    stored = json.load(f)
  assert stored["n_branches"] == [2, 3] and stored["topologies"] == ["hub", "full", "ring"]
  for n in ("2", "3"):
    for t in ("hub", "full", "ring"):
      mean, low, high = stored["merged_minus_experts_points"][n][t]
      assert low <= mean <= high
      assert stored["seeds_finished"][n][t] == [0]
  # Equal teacher matrices share one run: N = 2 runs CoPD once, N = 3 twice.
  assert sorted(os.listdir(runs / "full_ft" / "seed0" / "n2")) == ["copd_hub", "experts"]
  assert sorted(os.listdir(runs / "full_ft" / "seed0" / "n3")) == [
      "copd_full", "copd_hub", "experts"]
  assert set(stored["growth"]) == {"hub", "full", "ring"}
  assert (out / "scale_branches.md").exists()
  assert report["merged_minus_experts_points"] == stored["merged_minus_experts_points"]


def test_teacher_rows_on_one_device_are_the_cross_rows_by_hand():
  # N = 3, 2 cross prompts, 1 sample. Hub (branch 0): the hub sends 1 prompt to each
  # spoke, each spoke sends both of its prompts to the hub: 2 + 2 + 2 = 6 cross rows.
  # Each teacher compacts what it received to its real prompts (no padded slots), so on
  # one device the teacher forward scores exactly those 6 rows (the padded [S, J, C]
  # layout scored 3 x 3 x 2 = 18). Full mesh: 1 prompt per pair, 6 rows.
  assert scale_branches.teacher_rows(3, "hub", 2, 1) == {"teacher_forward_rows": 6,
                                                         "cross_rows": 6}
  assert scale_branches.teacher_rows(3, "full", 2, 1) == {"teacher_forward_rows": 6,
                                                          "cross_rows": 6}
  # Ring at N = 6, 4 cross prompts, 2 samples: 2 prompts (4 rows) per neighbour,
  # 6 x 4 x 2 = 48 rows (the padded layout: 6 x 6 x 4 = 144).
  assert scale_branches.teacher_rows(6, "ring", 4, 2) == {"teacher_forward_rows": 48,
                                                          "cross_rows": 48}
