"""CoPD's dip in RL phases and recovery in OPD phases, measured on FIXED diagnostic prompts
with diagnostics that track behaviour: symmetric KL and the rate of flawed-procedure answers
beside the top-10 overlap.

    python experiments/diagnostic_phases.py [--seeds 0] [--diagnostic_prompts 32] [--report_only]
        [--partial]   (with --report_only: report the steps logged so far by runs that
                       have not finished; the report says so)

overlap_phases.py measured the overlap after every step on FRESH prompts each step, so a
step's change mixed the policy's move with a new draw. Here the diagnostics
(copd_jax/rl/diagnostics.py) use the same prompts and sampling keys at every step and in
every run: step g's change, metric(after g) - metric(after g - 1), is paired on the same
prompts. The run is reproduce.py's CoPD config (same base, recipe, seeds) with the
diagnostics after every step (rl.diagnostics_every=1) on --diagnostic_prompts prompts per
branch; the diagnostics draw their own prompts and keys, so the training is the
reproduction's. Measures (each the mean over the branches, or over pairs of branches):
  - top-10 overlap between branches and with the base (the paper's diagnostic),
  - symmetric KL between branches and with the base (full vocabulary, same rollouts),
  - the share of flawed-procedure answers (toy_flaws.classify_response: the answer the
    base's demonstrated flawed procedure gives, among the prompts where it differs from
    the reference) and of right answers, on each branch's own sampled answers.
A dip-and-recovery shows as: overlap RL < 0 and OPD > 0; symmetric KL between branches
RL > 0 and OPD < 0; flawed rate -- RL learns away from the flaw, so the question is
whether OPD phases undo it (OPD > RL) or not.
Writes <out>/diagnostic_phases.{json,png}; last line printed: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overlap_phases  # noqa: E402  (phase split, per-step changes, summary)
import reproduce  # noqa: E402  (config building, run_or_load)

CAPS = ("text", "image", "video")
# report name -> metrics.jsonl key (a tuple: the mean of those keys)
METRIC_KEYS = {
    "top-10 overlap between branches": "eval/overlap/branches_mean",
    "top-10 overlap with the base": "eval/overlap/with_base_mean",
    "symmetric KL between branches": "eval/sym_kl/branches_mean",
    "symmetric KL with the base": "eval/sym_kl/with_base_mean",
    "flawed-procedure answer rate": tuple(f"eval/flawed_rate/{c}" for c in CAPS),
    "right answer rate": "eval/correct_rate/branches_mean",
}
MAIN = ("top-10 overlap between branches", "symmetric KL between branches",
        "flawed-procedure answer rate")


def levels(records, key) -> dict:
  """{'before', 'after'}: the metric before training (step 0) and after the last step."""
  steps, values, _ = overlap_phases.overlap_and_phase(records, key)
  return {"before": round(float(values[0]), 4), "after": round(float(values[-1]), 4),
          "last_step": int(steps[-1])}


def has_fixed_diagnostics(records) -> bool:
  """True when a run logged the fixed-prompt diagnostics (the answer rates come with them)."""
  return any("eval/correct_rate/branches_mean" in r for r in records)


def read_records(path: str) -> list[dict]:
  """metrics.jsonl's records; a last line cut short by a run still writing is dropped."""
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return out


def complete_steps(records) -> list[dict]:
  """The records of the steps a run in progress finished: those up to the last step
  whose diagnostics were logged (its training record comes before them)."""
  measured = [r["step"] for r in records if "eval/overlap/branches_mean" in r]
  last = max(measured, default=-1)
  return [r for r in records if r["step"] <= last]


def plot(per_seed_records, seeds, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(MAIN), 1, figsize=(10, 2.6 * len(MAIN)), sharex=True)
  for ax, name in zip(axes, MAIN):
    for seed, recs in zip(seeds, per_seed_records):
      steps, values, is_opd = overlap_phases.overlap_and_phase(recs, METRIC_KEYS[name])
      ax.plot(steps, values, marker="o", ms=2, label=f"seed {seed}")
    for s, opd in zip(steps, is_opd):
      if opd:  # step s trained from s-1 to s
        ax.axvspan(s - 1, s, color="grey", alpha=0.15, lw=0)
    ax.set_ylabel(name, fontsize=8)
    ax.legend(fontsize=7)
  axes[-1].set_xlabel("step (grey: OPD steps)")
  axes[0].set_title("CoPD, fixed diagnostic prompts measured after every step")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--diagnostic_prompts", type=int, default=32)
  parser.add_argument("--out", default="experiments/results")
  parser.add_argument("--runs", default="experiments/results/diagnostic_phases/runs")
  parser.add_argument("--partial", action="store_true",
                      help="with --report_only: report unfinished runs' steps so far")
  reproduce.add_rerun_arguments(parser, "diagnostic_phases.{json,png}")
  args = parser.parse_args(argv)
  args.quick = False
  seeds = [int(s) for s in args.seeds.split(",")]
  start = time.perf_counter()
  workdirs = overlap_phases.run_measured_copd(args, seeds)
  finished = [w for w in workdirs if os.path.exists(os.path.join(w, "summary.json"))]
  unfinished = sorted(set(workdirs) - set(finished))
  if unfinished and not (args.partial and args.report_only):
    raise SystemExit(f"not finished: {unfinished}; run without --report_only to run them "
                     "(or add --partial to report the steps logged so far)")
  records = [complete_steps(read_records(os.path.join(w, "metrics.jsonl"))) for w in workdirs]
  stale = [w for w, r in zip(workdirs, records) if not has_fixed_diagnostics(r)]
  if stale:
    raise SystemExit(f"{stale} logged no fixed-prompt diagnostics (a run from before them)")
  report = {"command": reproduce.command_line("diagnostic_phases.py", argv),
            "seeds": seeds, "diagnostic_prompts_per_branch": args.diagnostic_prompts,
            "prompts": "fixed: the same prompts and sampling keys at every step and seed",
            "unfinished_runs": unfinished,
            "last_step_by_seed": [max(r["step"] for r in recs) for recs in records],
            "mean_change_per_step": overlap_phases.summarize(records, METRIC_KEYS),
            "levels_by_seed": {name: [levels(r, key) for r in records]
                               for name, key in METRIC_KEYS.items()}}
  overlap_phases.write_report(args.out, "diagnostic_phases", report,
                              lambda path: plot(records, seeds, path))
  print(json.dumps({"minutes": round((time.perf_counter() - start) / 60, 1), "seeds": seeds,
                    **{f"{name}: opd_minus_rl": report["mean_change_per_step"][name][
                        "opd_minus_rl"]["mean"] for name in MAIN
                       if name in report["mean_change_per_step"]}}))


if __name__ == "__main__":
  main()
