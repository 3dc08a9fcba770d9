"""Ablate CoPD on the toy suite: interleave schedule, beta, hub / full mesh, branches, OPD estimator.

    python experiments/ablate.py [--seeds 0,1,2] [--only schedule,beta,hub,branches,estimator]
        [--set field=value ...]   (the same recipe as the reproduction it extends)
        [--report_only]           (rewrite the tables from the finished runs; run nothing)

Every variant is the `copd` config with overrides (nothing else changes), from the same
shared base, at the same budget (rl.steps per branch), evaluated on the same held-out
items as experiments/reproduce.py. The reference variant (1.5:1, beta 1, hub = text, three
branches) IS reproduce.py's CoPD run, and "2 branches (text, image)" its two-branch CoPD run:
both are read from --runs_reproduce (or run there if missing), not run twice. For each
variant: merged accuracy with a 95% interval (experiments/stats.py: seeds x items) and the
paired difference to the reference on the same items and seeds, overall and per
capability. Resumable like reproduce.py; a variant counts once it finished on every seed.
Writes <out>/ablation.md and ablation.json (last line printed: JSON).

Schedules (S_RL : S_OPD): no OPD, 3:1, 1.5:1 (the paper's), 1:1, 1:2, and adaptive (an OPD
phase of 2 steps whenever the hub-spoke overlap, measured every 2 steps, falls below
rl.opd.schedule.overlap_target).
Estimator: the paper's OPD signal (the teacher's log-prob of the sampled token, the
default) against rl.opd.estimator=top_k, a reverse KL on the teacher's top 16 tokens
renormalised (the "estimator" sweep; everything else is the reference's config).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402  (config building, run_or_load, intervals, tables)

import stats  # noqa: E402  (experiments/stats.py)

REFERENCE = "1.5:1 / beta 1 / hub text (reference)"
SCHEDULES = {
    "no OPD": dict(rl__opd__schedule__kind="none"),
    "3:1": dict(rl__opd__schedule__s_rl=3, rl__opd__schedule__s_opd=1),
    "1:1": dict(rl__opd__schedule__s_rl=2, rl__opd__schedule__s_opd=2),
    "1:2": dict(rl__opd__schedule__s_rl=1, rl__opd__schedule__s_opd=2),
    "adaptive": dict(rl__opd__schedule__kind="adaptive", rl__opd__schedule__s_opd=2,
                     rl__diagnostics_every=2),
}
BETAS = {f"beta = {b}": dict(rl__opd__beta=b) for b in (0.25, 4.0)}
HUBS = {f"hub = {h}": dict(rl__opd__hub=h) for h in ("image", "video")}
HUBS["full mesh"] = dict(rl__opd__topology="full")
TWO_BRANCH = "2 branches (text, image)"
BRANCHES = {  # two branches: the hub (text) and one spoke
    TWO_BRANCH: dict(rl__capabilities=("text", "image"), num_experts=2),
    "2 branches (text, video)": dict(rl__capabilities=("text", "video"), num_experts=2),
}
ESTIMATOR_VARIANT = "OPD estimator = top-k (k = 16)"
# The OPD estimator: the paper's (the teacher's log-prob of the sampled token) against a
# distribution-level reverse KL on the teacher's top 16 tokens (chunked loss backend).
ESTIMATORS = {ESTIMATOR_VARIANT: dict(rl__opd__estimator="top_k",
                                                     rl__opd__top_k=16)}
SWEEPS = {"schedule": SCHEDULES, "beta": BETAS, "hub": HUBS, "branches": BRANCHES,
          "estimator": ESTIMATORS}
# Variants that are runs of reproduce.py (same config): read from --runs_reproduce, not rerun.
REPRODUCE_RUN_OF = {REFERENCE: "copd", TWO_BRANCH: "copd_2branch"}


def variant_rewards(workdirs) -> dict[str, np.ndarray] | None:
  """{cap: f32[S, N]} of a variant's merged model, or None until every seed finished."""
  finished = all(os.path.exists(os.path.join(w, name)) for w in workdirs
                 for name in ("summary.json", "eval_rewards.npz"))
  if not finished:
    return None
  per_seed = [reproduce.load_rewards(w) for w in workdirs]
  caps = [k.split("/", 1)[1] for k in per_seed[0] if k.startswith("merged/")]
  return {c: np.stack([r[f"merged/{c}"] for r in per_seed]) for c in caps}


def summarize(results: dict, reference: dict) -> dict:
  """{variant: {'capabilities', 'accuracy_points', 'minus_reference_points'}}."""
  out = {}
  for name, rewards in results.items():
    caps = [c for c in reproduce.CAPS if c in rewards]
    entry = {"capabilities": caps,
             "accuracy_points": {c: reproduce.points(stats.mean_ci(rewards[c])) for c in caps}}
    entry["accuracy_points"]["overall"] = reproduce.points(
        stats.mean_ci(reproduce.overall(rewards, caps)))
    if name != REFERENCE:
      entry["minus_reference_points"] = {
          c: reproduce.points(stats.paired_difference_ci(rewards[c], reference[c])) for c in caps}
      entry["minus_reference_points"]["overall (its capabilities)"] = reproduce.points(
          stats.paired_difference_ci(reproduce.overall(rewards, caps),
                                     reproduce.overall(reference, caps)))
    out[name] = entry
  return out


def estimator_comparison(top_k: dict, sampled: dict) -> dict:
  """The OPD estimator ablation, merged CoPD with top-k OPD minus the paper's sampled-token
  OPD (the reference), paired on items and seeds: {'accuracy_points': {estimator: {cap |
  'overall': {'mean', 'ci95'}}}, 'top_k_minus_sampled_token_points': {cap | 'overall':
  {'mean', 'ci95', 'p', 'p_holm'}}} in points; Holm across the capabilities (the overall
  difference is reported beside them, not part of the family).
  top_k, sampled: {cap: f32[S, N]}, rows in the same seed order."""
  caps = [c for c in reproduce.CAPS if c in top_k and c in sampled]
  accuracy = {name: {c: reproduce.points(stats.mean_ci(r[c])) for c in caps}
              for name, r in (("top_k", top_k), ("sampled_token", sampled))}
  for name, r in (("top_k", top_k), ("sampled_token", sampled)):
    accuracy[name]["overall"] = reproduce.points(stats.mean_ci(reproduce.overall(r, caps)))
  diffs = reproduce._with_holm({c: reproduce.compare(top_k, sampled, [c]) for c in caps})
  diffs["overall"] = reproduce.compare(top_k, sampled, caps)
  return {"accuracy_points": accuracy, "top_k_minus_sampled_token_points": diffs,
          "multiple_comparisons": "Holm across the capabilities (p_holm)"}


def merged_eval_by_step(workdir: str) -> dict[int, dict[str, float]]:
  """{step: {cap: merged accuracy}} of a run's in-training evaluations (metrics.jsonl;
  rl.eval_examples held-out items per capability, the first of the final eval's); a last
  line cut short by a run still writing is dropped."""
  path, out = os.path.join(workdir, "metrics.jsonl"), {}
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        break
      caps = {c: record[f"eval/merged/accuracy/{c}"] for c in reproduce.CAPS
              if f"eval/merged/accuracy/{c}" in record}
      if caps:
        out[record["step"]] = caps
  return out


def estimator_interim(top_k_workdirs, reference_workdirs, seeds) -> dict:
  """While the top-k runs train: at each step where a top-k run has evaluated (every
  rl.eval_every steps), top_k - sampled_token merged accuracy in points per capability
  and overall, against the reference run's evaluation at the same step and seed (the
  same items). {'by_step': {step: {'seeds', cap | 'overall': mean over those seeds}}}.
  Interim only: rl.eval_examples items, no interval."""
  by_step: dict[int, dict] = {}
  for seed, top_dir, ref_dir in zip(seeds, top_k_workdirs, reference_workdirs):
    top, ref = merged_eval_by_step(top_dir), merged_eval_by_step(ref_dir)
    for step in sorted(set(top) & set(ref)):
      if step == 0:  # the same base: no difference to show
        continue
      d = {c: 100 * (top[step][c] - ref[step][c]) for c in top[step]}
      d["overall"] = float(np.mean(list(d.values())))
      by_step.setdefault(step, {}).setdefault("per_seed", {})[seed] = d
  for step, entry in by_step.items():
    per_seed = list(entry["per_seed"].values())
    entry["seeds"] = list(entry["per_seed"])
    for key in per_seed[0]:
      entry[key] = round(float(np.mean([d[key] for d in per_seed])), 2)
    entry["per_seed"] = {s: {k: round(v, 2) for k, v in d.items()}
                         for s, d in entry["per_seed"].items()}
  return {"by_step": {str(s): by_step[s] for s in sorted(by_step)},
          "note": "interim: in-training evaluations (rl.eval_examples items per "
                  "capability), no interval; the final comparison replaces it"}


def markdown_report(command: str, seeds, eval_examples: int, summary: dict,
                    unfinished: list[str]) -> str:
  """ablation.md: one table per sweep, accuracy and paired difference to the reference."""
  lines = [f"# CoPD ablations on the toy suite\n\nMade by `{command}`; seeds {seeds}; "
           f"{eval_examples} held-out items per capability. Merged-model accuracy "
           "in points: mean [95% interval]; 'minus reference' is the paired difference "
           f"to the reference variant ({REFERENCE}) on the same items and seeds, overall "
           "(over the variant's own capabilities) and per capability.\n"]
  for sweep_name, variants in [("reference", {REFERENCE: {}})] + list(SWEEPS.items()):
    rows = {n: summary[n] for n in variants if n in summary}
    if not rows:
      continue
    lines.append(f"## {sweep_name}\n")
    lines.append("| variant | accuracy overall | minus reference overall | "
                 + " | ".join(f"minus reference {c}" for c in reproduce.CAPS) + " |")
    lines.append("|---" * (3 + len(reproduce.CAPS)) + "|")
    for n, e in rows.items():
      diff = e.get("minus_reference_points", {})
      cells = [reproduce.fmt_cell(diff[c]) if c in diff else "—"
               for c in ["overall (its capabilities)"] + list(reproduce.CAPS)]
      lines.append(f"| {n} | {reproduce.fmt_cell(e['accuracy_points']['overall'])} | "
                   + " | ".join(cells) + " |")
    lines.append("")
  if unfinished:
    lines.append("Not finished on every seed yet (rerun the command to continue): "
                 + "; ".join(unfinished) + ".\n")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--only", default="schedule,beta,hub,branches,estimator")
  parser.add_argument("--out", default="experiments/results")
  parser.add_argument("--runs", default="experiments/results/ablation/runs",
                      help="variants' run directories (their small files are committed)")
  parser.add_argument("--runs_reproduce", default="experiments/results/runs",
                      help="reproduce.py's runs: the reference variant is its CoPD run")
  reproduce.add_rerun_arguments(parser, "ablation.{json,md}")
  args = parser.parse_args(argv)
  args.quick = False
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.out, exist_ok=True)
  command = reproduce.command_line("ablate.py", argv)
  start = time.perf_counter()

  def workdirs_of(name, root):
    if name in REPRODUCE_RUN_OF:
      return [f"{args.runs_reproduce}/seed{s}/{REPRODUCE_RUN_OF[name]}" for s in seeds]
    slug = "".join(ch if ch.isalnum() else "_" for ch in name)
    return [f"{root}/{slug}/seed{s}" for s in seeds]

  def run_variant(name, overrides, root):
    workdirs = workdirs_of(name, root)
    if not args.report_only:
      for seed, workdir in zip(seeds, workdirs):
        reproduce.run_or_load(reproduce.make_config("copd", seed, workdir, args, **overrides))
    return variant_rewards(workdirs)

  results = {REFERENCE: run_variant(REFERENCE, {}, None)}
  if args.report_only and results[REFERENCE] is None:
    raise SystemExit(f"the reference variant ({REFERENCE}) has not finished on seeds {seeds} "
                     f"under {args.runs_reproduce}; run it (drop --report_only) first")
  # Each variant is summarised once, when it finishes.
  summary = {} if results[REFERENCE] is None else summarize(
      {REFERENCE: results[REFERENCE]}, results[REFERENCE])

  def write_report():
    unfinished = [k for k, v in results.items() if v is None]
    minutes = (time.perf_counter() - start) / 60
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
      report = {"command": command, "minutes": round(minutes, 1), "seeds": seeds,
                "eval_examples_per_capability": args.eval_examples,
                "reference": REFERENCE, "variants": summary, "unfinished": unfinished}
      if results.get(ESTIMATOR_VARIANT) is not None and results[REFERENCE] is not None:
        report["estimator"] = estimator_comparison(results[ESTIMATOR_VARIANT],
                                                   results[REFERENCE])
      elif ESTIMATOR_VARIANT in results:  # running: the in-training evaluations so far
        top_dirs = workdirs_of(ESTIMATOR_VARIANT, f"{args.runs}/estimator")
        report["estimator_interim"] = estimator_interim(
            top_dirs, workdirs_of(REFERENCE, None), seeds)
        done = [i for i, w in enumerate(top_dirs)
                if os.path.exists(os.path.join(w, "summary.json"))]
        if done and results[REFERENCE] is not None:  # the seeds that finished, final eval
          top = variant_rewards([top_dirs[i] for i in done])
          ref = {c: r[done] for c, r in results[REFERENCE].items()}
          report["estimator_finished_seeds"] = dict(
              estimator_comparison(top, ref), seeds=[seeds[i] for i in done])
      json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
      f.write(markdown_report(command, seeds, args.eval_examples, summary, unfinished))

  for sweep in args.only.split(","):
    for name, overrides in SWEEPS[sweep].items():
      results[name] = run_variant(name, overrides, f"{args.runs}/{sweep}")
      if results[name] is not None:
        summary.update(summarize({name: results[name]}, results[REFERENCE]))
      if not args.report_only:  # an interrupted sweep already reports what finished
        write_report()
  if args.report_only:
    write_report()
  print(json.dumps({"minutes": round((time.perf_counter() - start) / 60, 1),
                    "variants": len(results), "seeds": seeds}))


if __name__ == "__main__":
  main()
