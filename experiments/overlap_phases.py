"""Does CoPD's branch overlap dip in RL phases and recover in OPD phases?

    python experiments/overlap_phases.py [--seeds 0,1,2] [--report_only]

The paper reports that during CoPD the branches' top-10 overlap falls while they do RL on
their own data and comes back while they distil from each other. reproduce.py measures the
overlap every 5 steps, the length of one 3 RL : 2 OPD cycle, so it always lands on the same
phase and cannot see that. This script reruns reproduce.py's CoPD config (same base, recipe,
seeds) with the overlap measured after EVERY step (rl.diagnostics_every=1) on 16 fresh
prompts per branch (rl.diagnostic_prompts=16). The diagnostics draw their own prompts and
random keys, so the training itself is the reproduction's run.

For each step g, the change in overlap is overlap(after g) - overlap(after g - 1), and the
step's phase is OPD when its logged OPD weight (train/opd_weight) is > 0, else RL. The
report gives the mean change per RL step and per OPD step, each with a 95% interval
(experiments/stats.py: seeds x steps), and the OPD-minus-RL difference. A dip-and-recovery shows
as RL < 0 and OPD > 0 for the overlap, RL > 0 and OPD < 0 for the symmetric KL (logged on
the same rollouts, summarised the same way). Writes <out>/overlap_phases.{json,png}; last line printed: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402  (config building, run_or_load, intervals)

import stats  # noqa: E402  (experiments/stats.py)

OVERLAP_KEYS = {  # report name -> metrics.jsonl key
    "between branches (all pairs)": "eval/overlap/branches_mean",
    "hub with spokes (the pairs that exchange)": "eval/overlap/linked_mean",
    "branches with the base": "eval/overlap/with_base_mean",
}
# Symmetric KL on the same rollouts: it moves with behaviour where the top-10 overlap of a
# 60-token vocabulary barely does. A dip shows as a rise in KL, a recovery as a fall.
SYM_KL_KEYS = {
    "symmetric KL between branches (all pairs)": "eval/sym_kl/branches_mean",
    "symmetric KL of branches with the base": tuple(
        f"eval/sym_kl/{c}|base" for c in ("text", "image", "video")),
}
METRIC_KEYS = {**OVERLAP_KEYS, **SYM_KL_KEYS}
OPD_WEIGHT_KEY = "train/opd_weight"


def _value(record, key):
  """record[key], or the mean of record[k] over a tuple of keys (None if any is absent)."""
  keys = key if isinstance(key, tuple) else (key,)
  if not all(k in record for k in keys):
    return None
  return float(np.mean([record[k] for k in keys]))


def overlap_and_phase(records, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps i[T+1], overlap f64[T+1], is_opd bool[T+1]) from one run's metrics records.

  steps: 0 (before training) and every step with an overlap measurement; is_opd[i] says
  whether step steps[i] was an OPD step (False for step 0, which trained nothing).
  Raises ValueError when a measured step has no logged OPD weight."""
  overlap, weight = {}, {}
  for r in records:
    value = _value(r, key)
    if value is not None:
      overlap[r["step"]] = value
    if OPD_WEIGHT_KEY in r:
      weight[r["step"]] = float(r[OPD_WEIGHT_KEY])
  steps = np.array(sorted(overlap), dtype=np.int64)
  missing = [int(s) for s in steps if s > 0 and s not in weight]
  if missing:
    raise ValueError(f"steps {missing[:5]} have {key} but no {OPD_WEIGHT_KEY}")
  is_opd = np.array([bool(s > 0 and weight[s] > 0) for s in steps], dtype=bool)
  return steps, np.array([overlap[s] for s in steps]), is_opd


def changes_by_phase(steps, overlap, is_opd) -> tuple[np.ndarray, np.ndarray]:
  """(rl_changes, opd_changes): overlap(g) - overlap(g - 1) for every step g > 0 whose
  previous step was measured too, split by g's phase."""
  steps, overlap, is_opd = np.asarray(steps), np.asarray(overlap), np.asarray(is_opd, bool)
  consecutive = np.diff(steps) == 1
  change = np.diff(overlap)[consecutive]
  opd = is_opd[1:][consecutive]
  return change[~opd], change[opd]


def phase_positions(is_opd) -> list[str]:
  """'RL 1', 'RL 2', 'OPD 1', ...: each step's phase and its place within that phase (the
  first entry, step 0, is '' since it trained nothing)."""
  labels, run = [""], 0
  for k in range(1, len(is_opd)):
    run = run + 1 if k > 1 and is_opd[k] == is_opd[k - 1] else 1
    labels.append(f"{'OPD' if is_opd[k] else 'RL'} {run}")
  return labels


def changes_by_position(steps, overlap, is_opd) -> dict[str, list[float]]:
  """{'RL 1': [changes], 'OPD 2': [...], ...}: the per-step overlap changes grouped by the
  step's place within its phase. Needs the overlap after every step (a step's place is
  counted from the phases of the steps before it); raises ValueError otherwise."""
  steps, overlap = np.asarray(steps), np.asarray(overlap)
  if np.any(np.diff(steps) != 1):
    raise ValueError("the place within a phase needs the overlap measured after every step "
                     f"(rl.diagnostics_every=1); measured steps: {steps.tolist()[:8]}...")
  labels = phase_positions(np.asarray(is_opd, bool))
  out: dict[str, list[float]] = {}
  for k in range(1, len(steps)):
    out.setdefault(labels[k], []).append(float(overlap[k] - overlap[k - 1]))
  return out


def summarize(per_seed_records, metric_keys=None) -> dict:
  """{metric name: {'rl_step_change', 'opd_step_change', 'opd_minus_rl',
  'change_by_place_in_phase'}}: mean change of the metric (a top-10 overlap or a symmetric
  KL, METRIC_KEYS unless `metric_keys` names others) per step of each phase (and per place within a phase: 'RL 1' is the
  first RL step after an OPD phase), in the metric's units, with 95% intervals."""
  def cell(value_and_ci):
    value, (low, high) = value_and_ci
    return {"mean": round(value, 4), "ci95": [round(low, 4), round(high, 4)]}

  out = {}
  for name, key in (METRIC_KEYS if metric_keys is None else metric_keys).items():
    measured = [overlap_and_phase(recs, key) for recs in per_seed_records]
    split = [changes_by_phase(*m) for m in measured]
    if not split or any(len(rl) == 0 or len(opd) == 0 for rl, opd in split):
      continue
    # The schedule is the same on every seed, so each seed has as many steps of each phase.
    rl = np.stack([rl for rl, _ in split])
    opd = np.stack([opd for _, opd in split])
    try:
      by_position = [changes_by_position(*m) for m in measured]
    except ValueError:  # not measured after every step: no per-place breakdown
      by_position = [{}]
    positions = [p for p in by_position[0] if all(
        len(b.get(p, ())) == len(by_position[0][p]) for b in by_position)]
    out[name] = {"rl_step_change": cell(stats.mean_ci(rl)),
                 "opd_step_change": cell(stats.mean_ci(opd)),
                 "opd_minus_rl": cell(stats.unpaired_difference_ci(opd, rl)),
                 "steps_per_seed": {"rl": int(rl.shape[1]), "opd": int(opd.shape[1])},
                 "change_by_place_in_phase": {
                     p: cell(stats.mean_ci(np.stack([b[p] for b in by_position])))
                     for p in sorted(positions)}}
  return out


def plot(per_seed_records, seeds, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(10, 4))
  for name, key in OVERLAP_KEYS.items():
    runs = [overlap_and_phase(recs, key) for recs in per_seed_records]
    n = min(len(s) for s, _, _ in runs)
    steps, values = runs[0][0][:n], np.stack([o[:n] for _, o, _ in runs])
    mean, std = values.mean(0), values.std(0)
    ax.plot(steps, mean, marker="o", ms=2, label=name)
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
  steps, _, is_opd = overlap_and_phase(per_seed_records[0], OVERLAP_KEYS[
      "between branches (all pairs)"])
  for s, opd in zip(steps, is_opd):
    if opd:  # step s trained from s-1 to s
      ax.axvspan(s - 1, s, color="grey", alpha=0.15, lw=0)
  ax.set_xlabel("step (grey: OPD steps)")
  ax.set_ylabel(f"top-10 overlap (mean ± std over seeds {seeds})")
  ax.set_title("CoPD, overlap measured after every step")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(out_dir: str, name: str, report: dict, plot_to) -> None:
  """<out_dir>/<name>.json, and <name>.png drawn by plot_to(path) when matplotlib is there."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  try:
    plot_to(os.path.join(out_dir, f"{name}.png"))
  except ImportError:
    print("matplotlib not installed (pip install -e '.[plots]'): no plot", flush=True)


def run_measured_copd(args, seeds) -> list[str]:
  """The CoPD config with the diagnostics after every step (rl.diagnostics_every=1,
  args.diagnostic_prompts per branch), one run per seed under args.runs: run, resumed or
  read (with args.report_only, only named). Returns their run directories."""
  workdirs = [f"{args.runs}/seed{s}" for s in seeds]
  for seed, workdir in zip(seeds, workdirs):
    if not args.report_only:
      reproduce.run_or_load(reproduce.make_config(
          "copd", seed, workdir, args, rl__diagnostics_every=1,
          rl__diagnostic_prompts=args.diagnostic_prompts))
  return workdirs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--diagnostic_prompts", type=int, default=16)
  parser.add_argument("--out", default="experiments/results")
  parser.add_argument("--runs", default="experiments/results/overlap_phases/runs")
  reproduce.add_rerun_arguments(parser, "overlap_phases.{json,png}")
  args = parser.parse_args(argv)
  args.quick = False
  seeds = [int(s) for s in args.seeds.split(",")]
  start = time.perf_counter()
  workdirs = run_measured_copd(args, seeds)
  finished = [w for w in workdirs if os.path.exists(os.path.join(w, "summary.json"))]
  if len(finished) < len(workdirs):
    raise SystemExit(f"not finished: {sorted(set(workdirs) - set(finished))}; run without "
                     "--report_only to run them")
  records = [reproduce.read_jsonl(os.path.join(w, "metrics.jsonl")) for w in workdirs]
  report = {"command": reproduce.command_line("overlap_phases.py", argv),
            "seeds": seeds, "diagnostic_prompts_per_branch": args.diagnostic_prompts,
            "mean_overlap_change_per_step": summarize(records)}
  write_report(args.out, "overlap_phases", report, lambda path: plot(records, seeds, path))
  main_key = report["mean_overlap_change_per_step"].get("between branches (all pairs)", {})
  print(json.dumps({"minutes": round((time.perf_counter() - start) / 60, 1), "seeds": seeds,
                    **{k: v["mean"] for k, v in main_key.items() if isinstance(v, dict)
                       and "mean" in v}}))


if __name__ == "__main__":
  main()
