"""Reproduce the paper's comparison on the toy suite, with intervals and paired tests.

    python experiments/reproduce.py [--seeds 0,1,2] [--quick] [--out experiments/results]

From one shared base policy (trained once, or reused), for every seed: the three
single-capability experts, mixed RLVR, MOPD and CoPD (three branches, hub = text), and in
a two-branch text + image setting static OPD both ways and CoPD. Every final model is
scored on the same held-out items (config.eval.num_examples per capability); each run
saves its per-item rewards (eval_rewards.npz), from which this script computes
  - mean accuracy over seeds with a 95% interval (bootstrap over seeds and items),
  - each method's paired difference to CoPD on the same items and seeds,
  - each expert's gain over the base on its own capability (paired, with its interval),
  - a verdict on each of the paper's three claims (rules in `claims`).
Writes to --out: results.md, results.json, accuracy_vs_step.png, overlap_vs_step.png.

Resumable: a run whose workdir holds a summary.json is read, not rerun, and a killed run
resumes from its checkpoints, so the same command continues where it stopped (results are
rewritten after every method). `--quick` trains only the experts, on one seed, with a
smaller eval set: a check that RL learns, in about 10 minutes.
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import sys
import time

import numpy as np

import run_archive  # experiments/run_archive.py: --runs given as an archive

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from copd_jax import (  # noqa: E402
  default_config,  # noqa: E402
  main as main_lib,  # noqa: E402
  run_dir,
  stats,
)

CAPS = ("text", "image", "video")
TWO = ("text", "image")
# An "at least as good" verdict needs the interval of the difference to exclude a loss
# bigger than this (points); "better" needs it to exclude 0.
EQUIVALENCE_MARGIN_POINTS = 2.0


# ------------------------------------------------------------------------------ runs

def add_rerun_arguments(parser, report: str):
  """The flags of the scripts that rerun this reproduction's CoPD config with changes
  (ablate.py, overlap_phases.py): eval set size, base, recipe and --report_only."""
  parser.add_argument("--eval_examples", type=int, default=1000,
                      help="held-out items per capability")
  parser.add_argument("--base_dir", default="experiments/results/base_policy")
  parser.add_argument("--set", action="append", default=[],
                      help="field=value for every run (the recipe; must match reproduce.py's)")
  parser.add_argument("--report_only", action="store_true",
                      help=f"rewrite {report} from the finished runs; run nothing")


def command_line(script: str, argv=None) -> str:
  """The command that runs (or continues) what `argv` asked for: --report_only dropped."""
  flags = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report_only"]
  return " ".join([f"python experiments/{script}"] + flags)


def parse_setting(item: str):
  """'rl.lr_schedule=cosine' -> ('rl.lr_schedule', 'cosine'); values are Python literals
  where they parse as one ('3e-4' -> 0.0003), else strings."""
  field, sep, value = item.partition("=")
  if not sep or not field:
    raise SystemExit(f"--set takes field=value, got {item!r}")
  try:
    return field, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return field, value


def make_config(method: str, seed: int, workdir: str, args, **overrides):
  cfg = default_config.get(method, "toy")
  cfg.seed = seed
  cfg.workdir = workdir
  cfg.warm_start.checkpoint_dir = args.base_dir
  cfg.eval.num_examples = args.eval_examples
  if args.quick and args.quick_steps:
    cfg.rl.steps = cfg.rl.distill_steps = args.quick_steps
    cfg.rl.eval_every = max(1, args.quick_steps // 4)
  for item in getattr(args, "set", None) or ():  # --set field=value: the recipe, every run
    field, value = parse_setting(item)
    default_config.set_field(cfg, field, value)
  for field, value in overrides.items():  # keyword `a__b` sets config field a.b
    default_config.set_field(cfg, field.replace("__", "."), value)
  return cfg


def run_or_load(cfg) -> dict:
  """The run's summary: read from its workdir when it finished before, else run it."""
  path = os.path.join(cfg.workdir, "summary.json")
  if os.path.exists(path):
    # A finished run of ANOTHER config is an error, not reused. Where stage-1 experts came
    # from (reused weights or retrained from the same seed) does not make another run.
    stored = run_dir.read_stored_config(cfg.workdir)
    diffs = [d for d in run_dir.differences(run_dir.training_config(stored),
                                            run_dir.training_config(cfg))
             if not d.startswith("rl.experts_dir")]
    if stored.get("method") != cfg.method or diffs:
      raise SystemExit(f"{cfg.workdir} holds a finished run of another config ({diffs[:5]}); "
                       "pass another --runs directory (or delete it) to rerun")
    with open(path) as f:
      return json.load(f)
  start = time.perf_counter()
  summary = main_lib.run(cfg)
  if summary is None:
    raise SystemExit(f"{cfg.workdir}: preempted; rerun the same command to resume")
  print(f"== {cfg.method} seed {cfg.seed}: {time.perf_counter() - start:.0f}s -> {cfg.workdir}",
        flush=True)
  return summary


def seed_runs(seed: int, args) -> dict:
  """name -> (method, overrides) of every run of one seed, in the order they run."""
  root = os.path.join(args.runs, f"seed{seed}")
  experts_dir = f"{root}/experts"
  runs = {"experts": ("experts", {})}
  if args.quick:
    return {name: (m, o, f"{root}/{name}") for name, (m, o) in runs.items()}
  two = dict(rl__capabilities=TWO, num_experts=2)
  # The two-stage baselines reuse this seed's experts when their weights are on disk; in
  # a fresh clone (only the runs' small files are committed) they retrain them from the
  # same seed and data streams instead.
  reuse = (dict(rl__experts_dir=experts_dir)
           if os.path.exists(os.path.join(experts_dir, "final_params")) else {})
  runs.update({
      "mixed_rlvr": ("mixed_rlvr", {}),
      "copd": ("copd", {}),
      "mopd": ("mopd", dict(reuse)),
      "static_opd_t2i": ("static_opd", dict(reuse)),
      "static_opd_i2t": ("static_opd", dict(reuse, rl__static_opd__teacher="image",
                                            rl__static_opd__student="text")),
      "copd_2branch": ("copd", two),
  })
  return {name: (m, o, f"{root}/{name}") for name, (m, o) in runs.items()}


# ------------------------------------------------------------- per-item rewards -> models

def load_rewards(workdir: str) -> dict[str, np.ndarray]:
  path = os.path.join(workdir, "eval_rewards.npz")
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def model_rewards(args, seeds, done) -> dict[str, dict[str, np.ndarray]]:
  """{model: {cap: f32[S, N]}} for every model whose runs finished on every seed
  (the base: f32[1, N], one shared policy)."""
  base = load_rewards(os.path.join(args.runs, "base"))
  models = {"Base": {c: base[f"base/{c}"][None] for c in CAPS}}

  def collect(name, run, key_of, caps):
    if not all((seed, run) in done for seed in seeds):
      return
    per_seed = [load_rewards(os.path.join(args.runs, f"seed{s}", run)) for s in seeds]
    models[name] = {c: np.stack([r[key_of(c)] for r in per_seed]) for c in caps}

  for cap in CAPS:
    collect(f"{cap.capitalize()} expert", "experts", lambda c, cap=cap: f"branch/{cap}/{c}", CAPS)
  collect("Mixed RLVR", "mixed_rlvr", lambda c: f"branch/text+image+video/{c}", CAPS)
  collect("MOPD", "mopd", lambda c: f"branch/student/{c}", CAPS)
  collect("CoPD (merged)", "copd", lambda c: f"merged/{c}", CAPS)
  for cap in CAPS:
    collect(f"CoPD {cap} branch", "copd", lambda c, cap=cap: f"branch/{cap}/{c}", CAPS)
  collect("Static OPD text→image", "static_opd_t2i", lambda c: f"branch/image/{c}", TWO)
  collect("Static OPD image→text", "static_opd_i2t", lambda c: f"branch/text/{c}", TWO)
  collect("CoPD 2-branch (merged)", "copd_2branch", lambda c: f"merged/{c}", TWO)
  return models


def overall(rewards: dict[str, np.ndarray], caps) -> np.ndarray:
  """Items of every capability side by side: the mean is the mean of capability means
  (every capability has the same number of items)."""
  return np.concatenate([rewards[c] for c in caps], axis=1)


def points(value_and_ci) -> dict:
  value, (low, high) = value_and_ci
  return {"mean": round(100 * value, 2), "ci95": [round(100 * low, 2), round(100 * high, 2)]}


def accuracy_table(models, caps) -> dict:
  """{model: {cap | 'overall': {'mean', 'ci95'}}} in points."""
  out = {}
  for name, rewards in models.items():
    if not all(c in rewards for c in caps):
      continue
    out[name] = {c: points(stats.mean_ci(rewards[c])) for c in caps}
    out[name]["overall"] = points(stats.mean_ci(overall(rewards, caps)))
  return out


def paired_to(models, reference: str, caps) -> dict:
  """{model: {cap | 'overall': paired difference model - reference}} in points."""
  if reference not in models:
    return {}
  ref = models[reference]
  out = {}
  for name, rewards in models.items():
    if name == reference or not all(c in rewards for c in caps):
      continue
    out[name] = {c: points(stats.paired_difference_ci(rewards[c], ref[c])) for c in caps}
    out[name]["overall"] = points(stats.paired_difference_ci(overall(rewards, caps),
                                                             overall(ref, caps)))
  return out


def transfer_matrix(models) -> dict:
  """{expert capability: {eval capability: gain over the base, paired}} in points."""
  out = {}
  for cap in CAPS:
    name = f"{cap.capitalize()} expert"
    if name in models:
      out[cap] = {c: points(stats.paired_difference_ci(models[name][c], models["Base"][c]))
                  for c in CAPS}
  return out


# --------------------------------------------------------------------------- claims

def _diff(models, a, b, caps) -> tuple[float, float, float]:
  """(mean, low, high) in points of a - b over `caps` (paired)."""
  value, (low, high) = stats.paired_difference_ci(overall(models[a], caps), overall(models[b], caps))
  return 100 * value, 100 * low, 100 * high


def claims(models) -> dict:
  """The paper's three claims, each 'supported' / 'refuted' / 'inconclusive', with the
  paired differences (points, 95% interval) behind the verdict. Rules:
  (a) mixed_loses_somewhere: supported if mixed RLVR is significantly below the expert
      on some capability (interval < 0); refuted if on every capability the interval
      excludes a loss larger than the margin; else inconclusive.
  (b) mopd_absorbs_less: the same test for the MOPD student against each expert.
  (c) copd_beats_all: supported if merged CoPD is at least each expert on its own
      capability (interval excludes a loss larger than the margin) AND significantly
      above mixed RLVR and MOPD overall; refuted if some expert is significantly better
      on its capability or mixed RLVR / MOPD is significantly better overall; else
      inconclusive.
  The margin is EQUIVALENCE_MARGIN_POINTS."""
  margin = EQUIVALENCE_MARGIN_POINTS
  out = {}

  def loses_somewhere(student):
    if student not in models or not all(f"{c.capitalize()} expert" in models for c in CAPS):
      return {"verdict": "inconclusive", "why": f"{student} or an expert has not run"}
    diffs = {c: _diff(models, student, f"{c.capitalize()} expert", [c]) for c in CAPS}
    if any(high < 0 for _, _, high in diffs.values()):
      verdict = "supported"
    elif all(low > -margin for _, low, _ in diffs.values()):
      verdict = "refuted"
    else:
      verdict = "inconclusive"
    return {"verdict": verdict, "minus_expert_points": {
        c: {"mean": round(m, 2), "ci95": [round(lo, 2), round(hi, 2)]}
        for c, (m, lo, hi) in diffs.items()}}

  out["mixed_loses_somewhere"] = loses_somewhere("Mixed RLVR")
  out["mopd_absorbs_less"] = loses_somewhere("MOPD")
  copd = "CoPD (merged)"
  needed = [copd, "Mixed RLVR", "MOPD"] + [f"{c.capitalize()} expert" for c in CAPS]
  if not all(n in models for n in needed):
    out["copd_beats_all"] = {"verdict": "inconclusive", "why": "not every method has run"}
  else:
    vs_expert = {c: _diff(models, copd, f"{c.capitalize()} expert", [c]) for c in CAPS}
    vs_mixed = _diff(models, copd, "Mixed RLVR", CAPS)
    vs_mopd = _diff(models, copd, "MOPD", CAPS)
    if (all(low > -margin for _, low, _ in vs_expert.values()) and vs_mixed[1] > 0
        and vs_mopd[1] > 0):
      verdict = "supported"
    elif (any(high < 0 for _, _, high in vs_expert.values()) or vs_mixed[2] < 0
          or vs_mopd[2] < 0):
      verdict = "refuted"
    else:
      verdict = "inconclusive"
    fmt = lambda d: {"mean": round(d[0], 2), "ci95": [round(d[1], 2), round(d[2], 2)]}
    out["copd_beats_all"] = {"verdict": verdict,
                             "minus_expert_own_points": {c: fmt(d) for c, d in vs_expert.items()},
                             "minus_mixed_overall_points": fmt(vs_mixed),
                             "minus_mopd_overall_points": fmt(vs_mopd)}
  return out


# ----------------------------------------------------------------------- reporting

@functools.lru_cache(maxsize=None)
def _read_jsonl_cached(path: str, mtime_ns: int, size: int) -> tuple:
  with open(path) as f:
    return tuple(json.loads(line) for line in f)


def read_jsonl(path):
  """The records of a JSONL file ([] if absent); each version of a file is parsed once
  however many series and overlaps a report takes from it."""
  if not os.path.exists(path):
    return []
  st = os.stat(path)
  return _read_jsonl_cached(path, st.st_mtime_ns, st.st_size)


def final_overlap(args, seeds, run: str) -> float | None:
  """Mean over seeds of the last between-branch top-10 overlap logged by `run`."""
  values = []
  for seed in seeds:
    recs = [r for r in read_jsonl(f"{args.runs}/seed{seed}/{run}/metrics.jsonl")
            if "eval/overlap/branches_mean" in r]
    if recs:
      values.append(recs[-1]["eval/overlap/branches_mean"])
  return float(np.mean(values)) if len(values) == len(seeds) else None


def series(args, seeds, run: str, key: str):
  """(steps, f64[S, T]) of a logged metric, truncated to the shortest seed."""
  per_seed = []
  for seed in seeds:
    recs = [r for r in read_jsonl(f"{args.runs}/seed{seed}/{run}/metrics.jsonl") if key in r]
    per_seed.append(([r["step"] for r in recs], [r[key] for r in recs]))
  n = min(len(v) for _, v in per_seed) if per_seed else 0
  if n == 0:
    return None
  return np.asarray(per_seed[0][0][:n]), np.asarray([v[:n] for _, v in per_seed], np.float64)


def plot(args, seeds, out_dir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def band(ax, data, label):
    if data is None:
      return
    steps, values = data
    mean, std = values.mean(0), values.std(0)
    ax.plot(steps, mean, marker="o", ms=3, label=label)
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2)

  curves = {  # label -> (run, metric key pattern per capability)
      "own expert": ("experts", "eval/{cap}/accuracy/{cap}"),
      "mixed RLVR": ("mixed_rlvr", "eval/text+image+video/accuracy/{cap}"),
      "CoPD merged": ("copd", "eval/merged/accuracy/{cap}"),
      "MOPD student (after its experts)": ("mopd", "eval/student/accuracy/{cap}"),
  }
  fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
  for ax, cap in zip(axes, CAPS):
    for label, (run, pattern) in curves.items():
      band(ax, series(args, seeds, run, pattern.format(cap=cap)), label)
    ax.set_title(f"{cap}: held-out accuracy (in-training eval subset)")
    ax.set_xlabel("optimizer step of the run")
  axes[0].set_ylabel(f"accuracy (mean ± std over {len(seeds)} seeds)")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "accuracy_vs_step.png"), dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(8, 4))
  for run, key, label in (("copd", "eval/overlap/branches_mean", "CoPD: between branches"),
                          ("experts", "eval/overlap/branches_mean", "experts: between branches"),
                          ("copd", "eval/overlap/with_base_mean", "CoPD: with base"),
                          ("experts", "eval/overlap/with_base_mean", "experts: with base")):
    band(ax, series(args, seeds, run, key), label)
  ax.set_xlabel("step")
  ax.set_ylabel(f"top-10 overlap (mean ± std over {len(seeds)} seeds)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "overlap_vs_step.png"), dpi=100)
  plt.close(fig)


def fmt_cell(d) -> str:
  return f"{d['mean']:.1f} [{d['ci95'][0]:.1f}, {d['ci95'][1]:.1f}]"


def markdown_table(table: dict, caps, title: str) -> str:
  names = list(table)
  lines = [f"| {title} | " + " | ".join(caps) + " | overall |", "|---" * (len(caps) + 2) + "|"]
  for name in names:
    lines.append(f"| {name} | " + " | ".join(fmt_cell(table[name][c]) for c in list(caps) + ["overall"]) + " |")
  return "\n".join(lines)


def write_results(args, seeds, done, command, minutes, out_dir) -> dict:
  models = model_rewards(args, seeds, done)
  three = {k: v for k, v in models.items() if all(c in v for c in CAPS)}
  two = {k: v for k, v in models.items() if k in ("Base", "Image expert", "Text expert")
         or set(v) == set(TWO)}
  own_gain = {c: stats.paired_difference_ci(models[f"{c.capitalize()} expert"][c],
                                            models["Base"][c])
              for c in CAPS if f"{c.capitalize()} expert" in models}
  result = {
      "command": command, "minutes": round(minutes, 1), "quick": args.quick,
      "eval_examples_per_capability": args.eval_examples, "seeds": seeds,
      "runs_finished": sorted(f"seed{s}/{r}" for s, r in done),
      "expert_own_gain_points": {c: round(100 * v, 2) for c, (v, _) in own_gain.items()},
      "expert_own_gain_ci95": {c: [round(100 * lo, 2), round(100 * hi, 2)]
                               for c, (_, (lo, hi)) in own_gain.items()},
      "expert_pair_overlap_final": final_overlap(args, seeds, "experts"),
      "copd_pair_overlap_final": final_overlap(args, seeds, "copd"),
      "transfer_matrix_points": transfer_matrix(models),
      "accuracy_points": accuracy_table(three, CAPS),
      "minus_copd_points": paired_to(three, "CoPD (merged)", CAPS),
      "accuracy_points_two_branch": accuracy_table(two, TWO),
      "minus_copd_two_branch_points": paired_to(two, "CoPD 2-branch (merged)", TWO),
      "claims": {},
      "claims_detail": {},
  }
  detail = claims(three)
  result["claims"] = {k: v["verdict"] for k, v in detail.items()}
  result["claims_detail"] = detail
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(result, f, indent=1)

  lines = [f"# Toy-suite reproduction\n\nMade by `{command}` ({minutes:.0f} minutes of "
           f"runs in this invocation); seeds {seeds}; {args.eval_examples} held-out items per "
           "capability. Cells: accuracy in points, mean over seeds [95% interval, bootstrap "
           "over seeds and items]. The base is one shared policy.\n",
           "## Three branches (text, image, video)\n", markdown_table(result["accuracy_points"], CAPS, "model")]
  if result["minus_copd_points"]:
    lines += ["\n### Paired difference to merged CoPD (model − CoPD, same items and seeds)\n",
              markdown_table(result["minus_copd_points"], CAPS, "model − CoPD")]
  if result["transfer_matrix_points"]:
    lines += ["\n### Transfer: each expert's gain over the base on every capability\n",
              markdown_table({f"{k} expert": {**v, "overall": points(stats.paired_difference_ci(
                  overall(models[f"{k.capitalize()} expert"], CAPS), overall(models["Base"], CAPS)))}
                  for k, v in result["transfer_matrix_points"].items()}, CAPS, "expert")]
  if len(result["accuracy_points_two_branch"]) > 3:
    lines += ["\n## Two branches (text + image)\n",
              markdown_table(result["accuracy_points_two_branch"], TWO, "model")]
  lines += [f"\nExpert pair top-10 overlap at the end: {result['expert_pair_overlap_final']}; "
            f"CoPD branches: {result['copd_pair_overlap_final']}.\n",
            "## Claims\n", "```", json.dumps(detail, indent=1), "```",
            "\n![accuracy](accuracy_vs_step.png)\n\n![overlap](overlap_vs_step.png)\n"]
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join(lines))
  try:
    plot(args, seeds, out_dir)
  except ImportError:
    print("matplotlib not installed (pip install -e '.[plots]'): no plots", flush=True)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default=None, help="comma-separated; default 0,1,2 (quick: 0)")
  parser.add_argument("--quick", action="store_true",
                      help="the experts only, one seed, 300 eval items (about 10 minutes)")
  parser.add_argument("--quick_steps", type=int, default=0,
                      help="with --quick: RL steps per expert (0 = the config's rl.steps)")
  parser.add_argument("--eval_examples", type=int, default=None,
                      help="held-out items per capability (default 1000; quick: 300)")
  parser.add_argument("--out", default=None, help="default experiments/results[/quick]")
  parser.add_argument("--runs", default=None,
                      help="default experiments/results/runs (quick: runs/reproduce_quick)")
  parser.add_argument("--base_dir", default="experiments/results/base_policy")
  parser.add_argument("--set", action="append", default=[],
                      help="field=value for every run (the recipe), e.g. rl.lr_schedule=cosine")
  parser.add_argument("--report_only", action="store_true",
                      help="rewrite the results from the runs that finished; run nothing")
  args = parser.parse_args(argv)
  seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
  args.eval_examples = args.eval_examples or (300 if args.quick else 1000)
  args.out = args.out or ("experiments/results/quick" if args.quick else "experiments/results")
  args.runs = args.runs or ("runs/reproduce_quick" if args.quick else "experiments/results/runs")
  args.runs = run_archive.runs_dir(args.runs, args.report_only)  # an earlier recipe's .tar.xz
  os.makedirs(args.out, exist_ok=True)
  flags = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report_only"]
  command = " ".join(["python experiments/reproduce.py"] + flags)  # the command that runs
  start = time.perf_counter()
  plan = {seed: seed_runs(seed, args) for seed in seeds}
  base = None
  if args.report_only:
    done = {(seed, name) for seed in seeds for name, (_, _, workdir) in plan[seed].items()
            if os.path.exists(os.path.join(workdir, "summary.json"))}
    result = write_results(args, seeds, done, command, 0.0, args.out)
  else:
    base = run_or_load(make_config("base", 0, os.path.join(args.runs, "base"), args))
    done = set()
    # Method by method over all seeds, rewriting the results after each method, so an
    # interrupted reproduction already reports every method that finished on every seed.
    for name in plan[seeds[0]]:
      for seed in seeds:
        method, overrides, workdir = plan[seed][name]
        run_or_load(make_config(method, seed, workdir, args, **overrides))
        done.add((seed, name))
      result = write_results(args, seeds, done, command, (time.perf_counter() - start) / 60,
                             args.out)
  print(json.dumps({k: result[k] for k in ("eval_examples_per_capability", "seeds",
                                           "expert_own_gain_points", "expert_own_gain_ci95",
                                           "expert_pair_overlap_final", "claims")}))
  return base


if __name__ == "__main__":
  main()
