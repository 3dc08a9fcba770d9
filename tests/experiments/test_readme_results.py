"""experiments/readme_results.py: the README's results paragraph is written from the reports,
so the committed README must say exactly what the committed reports hold."""
import json
import os
import sys

import pytest

import paths

sys.path.insert(0, paths.EXPERIMENTS)
import readme_results  # noqa: E402

RESULTS = os.path.join(paths.REPO, "experiments", "results")


def test_differences_are_printed_with_sign_and_flipped_by_hand():
  # results.json stores "X − CoPD"; the README says "CoPD − X": -4.3 [-9.4, 0.7] flips.
  stored = {"mean": -4.3, "ci95": [-9.4, 0.7]}
  assert readme_results.signed(readme_results.negated(stored)) == "+4.3 [-0.7, 9.4]"
  assert readme_results.signed([-0.06, -1.08, 0.96]) == "-0.1 [-1.1, 1.0]"


def _hand_result():
  overall = lambda m, lo, hi: {"overall": {"mean": m, "ci95": [lo, hi]}}  # noqa: E731
  return {
      "seeds": [0, 1, 2], "eval_examples_per_capability": 1000,
      "accuracy_points": {"CoPD (merged)": overall(60.3, 56.2, 64.4),
                          "Mixed RLVR": overall(56.0, 50.0, 62.0), "MOPD": overall(59.3, 55, 63)},
      "merged_experts": overall(59.7, 56, 63), "merged_experts_strong": overall(59.69, 56, 63),
      "minus_copd_points": {"Mixed RLVR": overall(-4.3, -9.4, 0.7),
                            "Merged experts": overall(-0.6, -2.6, 1.4),
                            readme_results.STRONG: overall(-0.6, -2.3, 1.1)},
      "interval_coverage_simulated": 0.9445,
      "claims": {"mixed_loses_somewhere": "supported", "mopd_absorbs_less": "inconclusive",
                 "copd_beats_all": "inconclusive", "copd_beats_merged_experts": "refuted"},
      "dial": [{"level": 0.0, "seeds": [0, 1], "expert_divergence_sym_kl": 0.19,
                "merged_experts_own_gap_points": {"mean": -0.7, "ci95": [-1.8, 0.3]}},
               {"level": 1.0, "seeds": [0, 1], "expert_divergence_sym_kl": 0.884,
                "merged_experts_own_gap_points": {"mean": 37.0, "ci95": [31.9, 42.0]},
                "copd_minus_merged_experts": [18.0, -0.8, 36.9],
                "copd_minus_merged_experts_per_seed": {"0": -6.5, "1": 35.1},
                "copd_minus_mopd": [-18.4, -36.0, -0.7], "copd_minus_mixed_rlvr": [-18.4, -36, -1],
                "mopd_minus_experts": [-0.5, -1.5, 0.4], "accuracy_points": {}}]}


def test_paragraph_from_a_hand_built_result(tmp_path):
  result = _hand_result()
  text = readme_results.paragraph(result, str(tmp_path))  # no other report there
  assert "merged CoPD scores 60.3 [56.2, 64.4]; mixed RLVR 56.0, MOPD 59.3" in text
  assert "CoPD − mixed RLVR +4.3 [-0.7, 9.4], − merged experts +0.6 [-1.4, 2.6]" in text
  assert "− strong merge +0.6 [-1.1, 2.3]" in text
  assert ">= 0.945" in text and "CoPD beats merged experts refuted" in text
  assert "+37.0 [31.9, 42.0] at conflict 1 (KL 0.88)" in text
  assert "CoPD − merged experts +18.0 [-0.8, 36.9] (per seed -6.5 to +35.1)" in text
  assert "− MOPD -18.4 [-36.0, -0.7]" in text
  assert "Top-k" not in text and "diagnostic" not in text  # their reports are absent
  assert "1:2" not in text  # the opt-in dial variant did not run
  far = result["dial"][-1]
  far.update(copd_opd_heavy_minus_merged_experts=[30.0, 10.0, 50.0],
             copd_opd_heavy_minus_copd=[12.0, -2.0, 26.0])
  text = readme_results.paragraph(result, str(tmp_path))
  assert "(1:2): − merged experts +30.0 [10.0, 50.0], − CoPD +12.0 [-2.0, 26.0]." in text


def test_block_is_replaced_between_the_markers_only():
  readme = f"# T\nbefore\n{readme_results.BEGIN}\nold numbers\n{readme_results.END}\nafter\n"
  new = readme_results.replace_block(readme, "new numbers")
  assert new == f"# T\nbefore\n{readme_results.BEGIN}\nnew numbers\n{readme_results.END}\nafter\n"
  with pytest.raises(ValueError, match="no results block"):
    readme_results.replace_block("# T\nno markers\n", "x")
  with pytest.raises(ValueError, match="no results block"):  # END before BEGIN
    readme_results.replace_block(f"{readme_results.END}\n{readme_results.BEGIN}\n", "x")


def test_committed_readme_says_what_the_committed_reports_hold():
  with open(os.path.join(RESULTS, "results.json")) as f:
    result = json.load(f)
  with open(os.path.join(paths.REPO, "README.md")) as f:
    readme = f.read()
  assert readme == readme_results.rewritten(readme, result, RESULTS), ("README.md's results block differs from the reports: run "
                              "`python experiments/reproduce.py --report_only`")
