"""The OPD estimator ablation's report (ablate.py) and the fixed-prompt diagnostics' report
(diagnostic_phases.py), each on hand-built runs, and their RESULTS.md sections."""
import json
import os
import sys

import numpy as np
import pytest

import paths

sys.path.insert(0, paths.EXPERIMENTS)
import ablate  # noqa: E402
import diagnostic_phases  # noqa: E402
import reproduce  # noqa: E402
import results_doc  # noqa: E402

CAPS = reproduce.CAPS
N = 400


def exact(accuracy: float, seeds: int = 3, shift: int = 0) -> np.ndarray:
  """f32[seeds, N]: the first round(accuracy * N) items right (rolled by `shift`) in every seed."""
  row = np.zeros(N, np.float32)
  row[: int(round(accuracy * N))] = 1
  return np.tile(np.roll(row, shift), (seeds, 1))


def refuse_to_run(cfg):
  raise AssertionError(f"report_only ran {cfg.workdir}")


def finished_run(workdir, seed_rewards):
  os.makedirs(workdir)
  np.savez(os.path.join(workdir, "eval_rewards.npz"),
           **{f"merged/{c}": r for c, r in seed_rewards.items()})
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    f.write("{}")


def test_estimator_ablation_by_hand(tmp_path, monkeypatch):
  monkeypatch.setattr(reproduce, "run_or_load", refuse_to_run)
  # top-k: text 0.62, image 0.30, video 0.55; sampled token: 0.60, 0.35, 0.55, on the same
  # first items: paired differences +2, -5, 0 points, overall (2 - 5 + 0) / 3 = -1.
  top_k = {"text": exact(0.62), "image": exact(0.30), "video": exact(0.55)}
  sampled = {"text": exact(0.60), "image": exact(0.35), "video": exact(0.55)}
  slug = "".join(ch if ch.isalnum() else "_" for ch in ablate.ESTIMATOR_VARIANT)
  for s in range(3):
    finished_run(str(tmp_path / f"rep/seed{s}/copd"), {c: r[s] for c, r in sampled.items()})
    finished_run(str(tmp_path / f"abl/estimator/{slug}/seed{s}"),
                 {c: r[s] for c, r in top_k.items()})
  ablate.main(["--report_only", "--seeds", "0,1,2", "--only", "estimator",
               "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "abl"),
               "--runs_reproduce", str(tmp_path / "rep")])
  est = json.loads((tmp_path / "out" / "ablation.json").read_text())["estimator"]
  assert est["accuracy_points"]["top_k"]["text"]["mean"] == 62.0
  assert est["accuracy_points"]["sampled_token"]["image"]["mean"] == 35.0
  diff = est["top_k_minus_sampled_token_points"]
  assert [diff[c]["mean"] for c in CAPS] == [2.0, -5.0, 0.0]
  assert diff["overall"]["mean"] == pytest.approx(-1.0)
  assert diff["video"]["p"] == 1.0  # no difference at all
  # Holm by hand over the three capabilities: sorted p1 <= p2 <= p3 get 3 p1,
  # max(3 p1, 2 p2), max(that, p3), each capped at 1.
  p = {c: diff[c]["p"] for c in CAPS}
  order = sorted(CAPS, key=lambda c: p[c])
  adjusted, running = {}, 0.0
  for k, c in enumerate(order):
    running = max(running, min(1.0, (3 - k) * p[c]))
    adjusted[c] = running
  for c in CAPS:
    assert diff[c]["p_holm"] == pytest.approx(adjusted[c], abs=1e-4)
  assert "p_holm" not in diff["overall"]  # reported beside the family, not in it
  doc = "\n".join(results_doc.estimator_section(str(tmp_path / "out")))
  assert "| top-k (k = 16) | 62.0 [" in doc and "| image | -5.0 [" in doc


def records_of(flawed: dict, kl: list, weights: dict) -> list[dict]:
  """metrics.jsonl-like records: fixed-prompt diagnostics at every step (flawed rates of
  the three branches {cap: [per step]}, branches' symmetric KL [per step]), OPD weights."""
  recs = [{"step": s, "train/opd_weight": w} for s, w in weights.items()]
  for step in range(len(kl)):
    r = {"step": step, "eval/sym_kl/branches_mean": kl[step],
         "eval/overlap/branches_mean": 0.9, "eval/overlap/with_base_mean": 0.9,
         "eval/sym_kl/with_base_mean": 0.1, "eval/correct_rate/branches_mean": 0.5}
    r.update({f"eval/flawed_rate/{c}": v[step] for c, v in flawed.items()})
    recs.append(r)
  return recs


def test_diagnostic_phases_report_by_hand(tmp_path, monkeypatch):
  monkeypatch.setattr(reproduce, "run_or_load", refuse_to_run)
  # Steps 1, 2 RL; 3 OPD; 4 RL. Branch flawed rates; their mean by step:
  # text  .6 .4 .3 .5 .2 | image .3 .3 .3 .3 .3 | video .3 .2 .0 .1 .1
  # mean  .4 .3 .2 .3 .2 -> RL changes -.1, -.1, -.1; OPD change +.1; OPD - RL = +.2.
  flawed = {"text": [.6, .4, .3, .5, .2], "image": [.3] * 5, "video": [.3, .2, .0, .1, .1]}
  kl = [0.0, 0.2, 0.4, 0.3, 0.5]  # RL +.2, +.2, +.2; OPD -.1
  weights = {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}
  workdir = tmp_path / "runs" / "seed0"
  workdir.mkdir(parents=True)
  (workdir / "summary.json").write_text("{}")
  with open(workdir / "metrics.jsonl", "w") as f:
    for r in records_of(flawed, kl, weights):
      f.write(json.dumps(r) + "\n")
  diagnostic_phases.main(["--report_only", "--seeds", "0", "--runs", str(tmp_path / "runs"),
                          "--out", str(tmp_path / "out")])
  report = json.loads((tmp_path / "out" / "diagnostic_phases.json").read_text())
  rate = report["mean_change_per_step"]["flawed-procedure answer rate"]
  assert rate["rl_step_change"]["mean"] == pytest.approx(-0.1)
  assert rate["opd_step_change"]["mean"] == pytest.approx(0.1)
  assert rate["opd_minus_rl"]["mean"] == pytest.approx(0.2)
  kl_row = report["mean_change_per_step"]["symmetric KL between branches"]
  assert kl_row["rl_step_change"]["mean"] == pytest.approx(0.2)
  assert kl_row["opd_step_change"]["mean"] == pytest.approx(-0.1)
  assert report["levels_by_seed"]["flawed-procedure answer rate"] == [
      {"before": 0.4, "after": 0.2, "last_step": 4}]
  doc = "\n".join(results_doc.diagnostics_section(str(tmp_path / "out")))
  assert "| flawed-procedure answer rate | -0.1 [" in doc and "0.4 → 0.2" in doc


def test_diagnostic_phases_refuses_runs_without_fixed_diagnostics(tmp_path, monkeypatch):
  monkeypatch.setattr(reproduce, "run_or_load", refuse_to_run)
  workdir = tmp_path / "runs" / "seed0"
  workdir.mkdir(parents=True)
  (workdir / "summary.json").write_text("{}")
  (workdir / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/overlap/branches_mean": 1}))
  with pytest.raises(SystemExit, match="no fixed-prompt diagnostics"):
    diagnostic_phases.main(["--report_only", "--seeds", "0", "--runs", str(tmp_path / "runs"),
                            "--out", str(tmp_path / "out")])


def test_diagnostic_phases_partial_report_of_a_run_in_progress(tmp_path, monkeypatch):
  monkeypatch.setattr(reproduce, "run_or_load", refuse_to_run)
  flawed = {"text": [.6, .4, .3, .5], "image": [.3] * 4, "video": [.3, .2, .0, .1]}
  workdir = tmp_path / "runs" / "seed0"
  workdir.mkdir(parents=True)
  recs = records_of(flawed, [0.0, 0.2, 0.4, 0.3], {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0})
  with open(workdir / "metrics.jsonl", "w") as f:  # step 4 trained, not yet measured,
    for r in sorted(recs, key=lambda r: r["step"]):  # and a line cut short
      f.write(json.dumps(r) + "\n")
    f.write('{"step": 4, "eval/ov')
  args = ["--report_only", "--seeds", "0", "--runs", str(tmp_path / "runs"),
          "--out", str(tmp_path / "out")]
  with pytest.raises(SystemExit, match="not finished"):
    diagnostic_phases.main(args)
  diagnostic_phases.main(args + ["--partial"])
  report = json.loads((tmp_path / "out" / "diagnostic_phases.json").read_text())
  assert report["last_step_by_seed"] == [3] and report["unfinished_runs"]
  rate = report["mean_change_per_step"]["flawed-procedure answer rate"]
  assert rate["steps_per_seed"] == {"rl": 2, "opd": 1}  # step 4 not counted
  assert rate["opd_step_change"]["mean"] == pytest.approx(0.1)
  doc = "\n".join(results_doc.diagnostics_section(str(tmp_path / "out")))
  assert "NOT FINISHED: steps 0 to [3]" in doc


def test_estimator_interim_pairs_in_training_evaluations_by_step_and_seed(tmp_path):
  def run(name, evals, cut_short=False):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "metrics.jsonl", "w") as f:
      for step, (t, i, v) in evals.items():
        f.write(json.dumps({"step": step, "eval/merged/accuracy/text": t,
                            "eval/merged/accuracy/image": i,
                            "eval/merged/accuracy/video": v}) + "\n")
        f.write(json.dumps({"step": step, "train/loss": 0.1}) + "\n")
      if cut_short:
        f.write('{"step": 30, "eval/merged/accu')
    return str(tmp_path / name)

  # seed 0: top-k at step 10 (.50, .30, .40) vs reference (.45, .35, .40): +5, -5, 0 -> 0;
  # step 20: (.60, .40, .50) vs (.50, .40, .50): +10, 0, 0 -> 3.33.
  # seed 1: only step 10 so far: (.40, .40, .40) vs (.40, .30, .40): 0, +10, 0 -> 3.33.
  top = [run("top0", {0: (.3, .3, .3), 10: (.5, .3, .4), 20: (.6, .4, .5)}, cut_short=True),
         run("top1", {0: (.3, .3, .3), 10: (.4, .4, .4)})]
  ref = [run("ref0", {0: (.3, .3, .3), 10: (.45, .35, .4), 20: (.5, .4, .5), 30: (.5, .4, .5)}),
         run("ref1", {0: (.3, .3, .3), 10: (.4, .3, .4), 20: (.4, .3, .4)})]
  got = ablate.estimator_interim(top, ref, [0, 1])["by_step"]
  assert list(got) == ["10", "20"]  # step 0 is the shared base; 30 not reached by top-k
  assert got["10"]["seeds"] == [0, 1]
  assert got["10"]["text"] == pytest.approx(2.5) and got["10"]["image"] == pytest.approx(2.5)
  assert got["10"]["overall"] == pytest.approx((0 + 10 / 3) / 2, abs=0.01)
  assert got["20"]["seeds"] == [0] and got["20"]["overall"] == pytest.approx(3.33, abs=0.01)
