"""The claim verdicts of experiments/reproduce.py on hand-built per-item rewards."""
import argparse
import json
import os
import sys

import numpy as np
import pytest

import paths

sys.path.insert(0, paths.EXPERIMENTS)
import reproduce  # noqa: E402

CAPS = reproduce.CAPS
N = 400


def rewards(accuracy: dict, seeds: int = 3, shift: int = 0) -> dict:
  """{cap: f32[S, N]} with exactly round(accuracy[cap] * N) correct items per seed (the
  first ones, rotated by `shift`), so differences between models are exact by hand."""
  out = {}
  for cap in CAPS:
    row = np.zeros(N)
    row[: int(round(accuracy[cap] * N))] = 1
    out[cap] = np.tile(np.roll(row, shift), (seeds, 1))
  return out


def models(mixed, mopd, copd):
  base = {c: 0.3 for c in CAPS}
  m = {"Base": {c: r[:1] for c, r in rewards(base).items()}}
  for cap in CAPS:  # each expert: 0.6 on its own capability, 0.3 elsewhere
    m[f"{cap.capitalize()} expert"] = rewards({c: 0.6 if c == cap else 0.3 for c in CAPS})
  m["Mixed RLVR"] = rewards(mixed)
  m["MOPD"] = rewards(mopd)
  m["CoPD (merged)"] = rewards(copd)
  return m


def test_verdicts_by_hand():
  # Mixed loses 20 points on video, MOPD loses 10 on every capability, CoPD equals every
  # expert on its own capability and beats both baselines overall.
  m = models(mixed={"text": 0.6, "image": 0.6, "video": 0.4},
             mopd={c: 0.5 for c in CAPS}, copd={c: 0.6 for c in CAPS})
  c = reproduce.claims(m)
  assert c["mixed_loses_somewhere"]["verdict"] == "supported"
  assert c["mixed_loses_somewhere"]["minus_expert_points"]["video"]["mean"] == -20.0
  assert c["mopd_absorbs_less"]["verdict"] == "supported"
  assert c["copd_beats_all"]["verdict"] == "supported"
  assert c["copd_beats_all"]["minus_mixed_overall_points"]["mean"] == round(100 * 0.2 / 3, 2)


def test_refuted_verdicts():
  # Mixed and MOPD match the experts everywhere (identical items): "loses" is refuted;
  # mixed then beats a CoPD that stayed at the base: CoPD's claim is refuted.
  m = models(mixed={c: 0.6 for c in CAPS}, mopd={c: 0.6 for c in CAPS},
             copd={c: 0.3 for c in CAPS})
  c = reproduce.claims(m)
  assert c["mixed_loses_somewhere"]["verdict"] == "refuted"
  assert c["mopd_absorbs_less"]["verdict"] == "refuted"
  assert c["copd_beats_all"]["verdict"] == "refuted"


def test_copd_against_merged_experts_by_hand():
  m = models(mixed={c: 0.6 for c in CAPS}, mopd={c: 0.6 for c in CAPS},
             copd={c: 0.6 for c in CAPS})
  m[reproduce.MERGED] = rewards({c: 0.5 for c in CAPS})
  c = reproduce.claims(m)["copd_beats_merged_experts"]
  assert c["verdict"] == "supported" and c["merges_judged"] == [reproduce.MERGED]
  assert c["minus_merged_overall_points"][reproduce.MERGED]["mean"] == 10.0
  # A stronger merge that beats CoPD everywhere refutes it, whatever the uniform one does.
  m[reproduce.MERGED_STRONG] = rewards({c: 0.7 for c in CAPS})
  c = reproduce.claims(m)["copd_beats_merged_experts"]
  assert c["verdict"] == "refuted"
  diffs = c["minus_merged_overall_points"]
  assert diffs[reproduce.MERGED_STRONG]["mean"] == -10.0
  assert diffs[reproduce.MERGED_STRONG]["p_holm"] >= diffs[reproduce.MERGED_STRONG]["p"]


def test_holm_decides_loses_somewhere():
  # Noisy seeds: mixed RLVR is below the video expert with an unadjusted p under 0.05
  # but a Holm-adjusted p over it (3 capabilities): not "supported".
  m = models(mixed={c: 0.6 for c in CAPS}, mopd={c: 0.6 for c in CAPS},
             copd={c: 0.6 for c in CAPS})
  video = m["Video expert"]["video"].copy()
  per_seed_drop = [0.10, 0.13, 0.07]  # mean 0.10, sd 0.03 over 3 seeds: t = 5.8, p ~ 0.03
  mixed = video.copy()
  for s, drop in enumerate(per_seed_drop):
    mixed[s, : int(round(drop * N))] = 0.0  # the expert's first items are its correct ones
  m["Mixed RLVR"]["video"] = mixed
  d = reproduce.claims(m)["mixed_loses_somewhere"]
  video_test = d["minus_expert_points"]["video"]
  assert video_test["mean"] == -10.0
  assert video_test["p"] < 0.05 < video_test["p_holm"]
  assert d["verdict"] == "inconclusive"


def test_missing_runs_are_inconclusive():
  m = models(mixed={c: 0.6 for c in CAPS}, mopd={c: 0.6 for c in CAPS},
             copd={c: 0.6 for c in CAPS})
  del m["MOPD"]
  c = reproduce.claims(m)
  assert c["mopd_absorbs_less"]["verdict"] == "inconclusive"
  assert c["copd_beats_all"]["verdict"] == "inconclusive"


def test_recipe_settings_reach_every_run_config():
  args = argparse.Namespace(base_dir="b", eval_examples=10, quick=False, quick_steps=0,
                            set=["rl.lr_schedule=cosine", "rl.learning_rate=3e-4",
                                 "warm_start.steps=1500"])
  cfg = reproduce.make_config("experts", 1, "w", args, rl__steps=7)
  assert (cfg.rl.lr_schedule, cfg.rl.learning_rate, cfg.warm_start.steps) == ("cosine", 3e-4, 1500)
  assert cfg.rl.steps == 7 and cfg.seed == 1
  with pytest.raises(SystemExit, match="field=value"):
    reproduce.parse_setting("rl.steps")


def test_ablation_reads_the_reproductions_copd_runs_instead_of_rerunning(tmp_path, monkeypatch):
  import ablate
  calls = []
  monkeypatch.setattr(reproduce, "run_or_load", lambda cfg: calls.append(cfg) or {})
  ablate.main(["--seeds", "0,1", "--only", "branches", "--out", str(tmp_path / "out"),
               "--runs", str(tmp_path / "abl"), "--runs_reproduce", str(tmp_path / "rep"),
               "--set", "rl.lr_end_fraction=0.3"])
  by_dir = {os.path.relpath(c.workdir, tmp_path): c for c in calls}
  # the reference and the (text, image) variant are reproduce.py's own run directories
  plan = reproduce.seed_runs(1, argparse.Namespace(runs=str(tmp_path / "rep"), quick=False))
  assert os.path.relpath(plan["copd_2branch"][2], tmp_path) == "rep/seed1/copd_2branch"
  assert set(by_dir) == {"rep/seed0/copd", "rep/seed1/copd", "rep/seed0/copd_2branch",
                         "rep/seed1/copd_2branch", "abl/branches/2_branches__text__video_/seed0",
                         "abl/branches/2_branches__text__video_/seed1"}
  two = by_dir["rep/seed1/copd_2branch"]
  assert tuple(two.rl.capabilities) == ("text", "image") and two.num_experts == 2
  assert two.method == plan["copd_2branch"][0] == "copd"
  assert two.rl.lr_end_fraction == 0.3 and two.seed == 1


def refuse_to_run(cfg):
  """Stands in for reproduce.run_or_load where a report must run nothing."""
  raise AssertionError(f"report_only ran {cfg.workdir}")


def test_report_only_rewrites_results_from_finished_runs_and_runs_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(reproduce, "run_or_load", refuse_to_run)
  rng = np.random.default_rng(0)
  base = {f"base/{c}": (rng.random(50) < 0.3).astype(np.float32) for c in CAPS}
  runs = tmp_path / "runs"
  (runs / "base").mkdir(parents=True)
  np.savez(runs / "base" / "eval_rewards.npz", **base)
  experts = []
  for seed in (0, 1):
    rewards = {f"branch/{e}/{c}": (rng.random(50) < 0.6).astype(np.float32)
               for e in CAPS for c in CAPS}
    rewards.update({f"merged/{c}": (rng.random(50) < 0.7).astype(np.float32) for c in CAPS})
    experts.append(rewards)
    workdir = runs / f"seed{seed}" / "experts"
    workdir.mkdir(parents=True)
    np.savez(workdir / "eval_rewards.npz", **rewards)
    (workdir / "summary.json").write_text("{}")
  (runs / "seed0" / "mixed_rlvr").mkdir()  # started, not finished: not reported
  reproduce.main(["--report_only", "--seeds", "0,1", "--runs", str(runs),
                  "--out", str(tmp_path / "out"), "--dial_runs", ""])
  result = json.loads((tmp_path / "out" / "results.json").read_text())
  assert result["runs_finished"] == ["seed0/experts", "seed1/experts"]
  assert "--report_only" not in result["command"]
  for c in CAPS:  # paired gain = mean over seeds and items of expert - base, by hand
    by_hand = 100 * np.mean([e[f"branch/{c}/{c}"] - base[f"base/{c}"] for e in experts])
    assert abs(result["expert_own_gain_points"][c] - round(by_hand, 2)) < 1e-6
  assert result["claims"]["mixed_loses_somewhere"] == "inconclusive"
  # The experts run's uniform merge is the merged-experts baseline, by hand.
  merged = result["merged_experts"]
  by_hand = 100 * np.mean([e[f"merged/{c}"] for e in experts for c in CAPS])
  assert abs(merged["overall"]["mean"] - round(by_hand, 2)) < 1e-6
  assert merged["overall"]["ci95"][0] <= merged["overall"]["mean"] <= merged["overall"]["ci95"][1]
  assert result["merged_experts_strong"] is None  # not run
  assert result["interval_method"] and result["dial"] == []
  doc = (tmp_path / "out" / "RESULTS.md").read_text()
  assert f"| Merged experts | " in doc and str(merged["overall"]["mean"]) in doc


def test_ablation_report_only_pairs_each_variant_with_the_reference_and_runs_nothing(
    tmp_path, monkeypatch):
  import ablate
  monkeypatch.setattr(reproduce, "run_or_load", refuse_to_run)
  rng = np.random.default_rng(1)

  def finished_run(workdir, seed_rewards, done=True):
    os.makedirs(workdir)
    np.savez(os.path.join(workdir, "eval_rewards.npz"),
             **{f"merged/{c}": r for c, r in seed_rewards.items()})
    if done:
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        f.write("{}")

  reference, no_opd = [], []
  for seed in (0, 1):
    reference.append({c: (rng.random(60) < 0.5).astype(np.float32) for c in CAPS})
    no_opd.append({c: (rng.random(60) < 0.4).astype(np.float32) for c in CAPS})
    finished_run(str(tmp_path / f"rep/seed{seed}/copd"), reference[-1])
    finished_run(str(tmp_path / f"abl/schedule/no_OPD/seed{seed}"), no_opd[-1])
  finished_run(str(tmp_path / "abl/schedule/3_1/seed0"), no_opd[0])  # seed 1 not run yet
  finished_run(str(tmp_path / "abl/schedule/1_1/seed0"), no_opd[0])
  finished_run(str(tmp_path / "abl/schedule/1_1/seed1"), no_opd[1], done=False)  # crashed
  ablate.main(["--report_only", "--seeds", "0,1", "--only", "schedule",
               "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "abl"),
               "--runs_reproduce", str(tmp_path / "rep")])
  result = json.loads((tmp_path / "out" / "ablation.json").read_text())
  assert set(result["variants"]) == {ablate.REFERENCE, "no OPD"}
  assert set(result["unfinished"]) == {"3:1", "1:1", "1:2", "adaptive"}
  diff = result["variants"]["no OPD"]["minus_reference_points"]
  for c in CAPS:  # paired difference = mean over seeds and items of variant - reference
    by_hand = 100 * np.mean([v[c] - r[c] for v, r in zip(no_opd, reference)])
    assert abs(diff[c]["mean"] - round(by_hand, 2)) < 1e-6
    assert diff[c]["ci95"][0] <= diff[c]["mean"] <= diff[c]["ci95"][1]
  by_hand = 100 * np.mean([v[c] - r[c] for v, r in zip(no_opd, reference) for c in CAPS])
  assert abs(diff["overall (its capabilities)"]["mean"] - round(by_hand, 2)) < 1e-6
  assert "--report_only" not in result["command"]
  report = (tmp_path / "out" / "ablation.md").read_text()
  assert "| no OPD |" in report and "Not finished" in report and "3:1" in report
  with pytest.raises(SystemExit, match="reference variant"):
    ablate.main(["--report_only", "--seeds", "0,1,2", "--only", "schedule",
                 "--out", str(tmp_path / "out2"), "--runs", str(tmp_path / "abl"),
                 "--runs_reproduce", str(tmp_path / "rep")])
