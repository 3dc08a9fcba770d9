"""Reproduce the paper's comparison on the toy suite, with intervals and paired tests.

    python experiments/reproduce.py [--seeds 0,1,2] [--quick] [--out experiments/results]

From one shared base policy (trained once, or reused), for every seed: the three
single-capability experts, mixed RLVR, MOPD and CoPD (three branches, hub = text), and in
a two-branch text + image setting static OPD both ways and CoPD; and two merges of the
independent experts as baselines: their uniform weight average (scored by the experts
run) and the best on the validation split of task-arithmetic and TIES merges
(experiments/merge_experts.py; it needs the experts' weights, and retrains them from the
same seed into `experts_weights` where only their small files are on disk). Every final
model is scored on the same held-out items (config.eval.num_examples per capability);
each run saves its per-item rewards (eval_rewards.npz), from which this script computes
  - mean accuracy over seeds with a 95% interval (experiments/stats.py: a seed-level t
    interval with the items' variance added; its coverage is checked by simulation),
  - each method's paired difference to CoPD on the same items and seeds,
  - each expert's gain over the base on its own capability (paired, with its interval),
  - a verdict on each of the paper's three claims and on CoPD against the merged experts
    (rules in `claims`; Holm across the capabilities inside a claim),
  - the divergence dial's levels, read from experiments/dial.py's finished runs.
Writes to --out: results.json, accuracy_vs_step.png, overlap_vs_step.png,
final_accuracy.png, dial.png; and RESULTS.md (experiments/RESULTS.md for the default
--out): every table and verdict, written from results.json.

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
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402  (experiments/stats.py)

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
                                            run_dir.training_config(json.loads(cfg.to_json_best_effort())))
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
  # A study runs dozens of runs in one process, most with programs of their own (other
  # branch counts, recipes, configs). XLA:CPU maps every compiled program's code into
  # memory; kept alive by jax's caches, the mappings reach the kernel's per-process limit
  # (vm.max_map_count, 65,530) after about 17 runs of the 12-branch scaling study, and the
  # next compile fails with "LLVM compilation error: Cannot allocate memory". A next run of
  # the same shapes (equal RunShardings share programs) pays one compile for it.
  import jax  # (here: --report_only never imports jax)
  jax.clear_caches()
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
      # Not a training run: the best of task arithmetic / TIES merges (merge_experts.py).
      STRONG_MERGE: (STRONG_MERGE, {}),
      "mixed_rlvr": ("mixed_rlvr", {}),
      "copd": ("copd", {}),
      "mopd": ("mopd", dict(reuse)),
      "static_opd_t2i": ("static_opd", dict(reuse)),
      "static_opd_i2t": ("static_opd", dict(reuse, rl__static_opd__teacher="image",
                                            rl__static_opd__student="text")),
      "copd_2branch": ("copd", two),
  })
  return {name: (m, o, f"{root}/{name}") for name, (m, o) in runs.items()}


STRONG_MERGE = "merged_experts_strong"
SEEDS_KEY = "seeds"  # in a model's rewards {cap: f[S, N], SEEDS_KEY: [seed of each row]}


def strong_merge(seed: int, args) -> dict:
  """The strongest of task arithmetic and TIES merges of this seed's experts on the
  validation split (experiments/merge_experts.py); read when it finished before. It needs the experts'
  weights: where only the experts' small files are on disk (a fresh clone, or weights
  cleaned away), the experts are retrained from the same seed into `experts_weights`
  first, and the summary records how far their held-out rewards agree with the
  committed run's."""
  import merge_experts
  root = os.path.join(args.runs, f"seed{seed}")
  out_dir = os.path.join(root, STRONG_MERGE)
  path = os.path.join(out_dir, "summary.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  experts_dir, reference = os.path.join(root, "experts"), None
  if not os.path.exists(os.path.join(experts_dir, "final_params")):
    reference, experts_dir = experts_dir, os.path.join(root, "experts_weights")
    run_or_load(make_config("experts", seed, experts_dir, args))
  cfg = make_config("experts", seed, experts_dir, args)
  summary = merge_experts.score_strong_merge(cfg, experts_dir, out_dir, reference)
  print(f"== strong merge seed {seed}: {summary['chosen']} -> {out_dir}", flush=True)
  return summary


# ------------------------------------------------------------- per-item rewards -> models

def load_rewards(workdir: str) -> dict[str, np.ndarray]:
  path = os.path.join(workdir, "eval_rewards.npz")
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


MERGED = "Merged experts"
MERGED_STRONG = "Merged experts (strong: TA or TIES)"
# Where the experts were retrained for their weights (strong_merge), the retrained experts'
# own uniform merge: the task-arithmetic merge's like-for-like reference (floating point
# on another CPU drifts, so retrained experts are not the committed ones bit for bit).
MERGED_RETRAINED = "Merged experts, retrained (uniform)"
RETRAINED_SUFFIX = ", retrained"


def model_rewards(args, seeds, done) -> dict[str, dict[str, np.ndarray]]:
  """{model: {cap: f32[S, N]}} for every model whose runs finished on every seed
  (the base: f32[1, N], one shared policy). The task-arithmetic merge counts on the
  seeds it finished while its experts are being retrained for their weights. Every
  seed-dependent model records its seeds (SEEDS_KEY), so comparisons pair the seeds
  both sides finished."""
  base = load_rewards(os.path.join(args.runs, "base"))
  models = {"Base": {c: base[f"base/{c}"][None] for c in CAPS}}

  def collect(name, run, key_of, caps, partial=False):
    finished = [s for s in seeds if (s, run) in done or (
        run == "experts_weights"
        and os.path.exists(os.path.join(args.runs, f"seed{s}", run, "summary.json")))]
    if not finished or (len(finished) < len(seeds) and not partial):
      return
    per_seed = [load_rewards(os.path.join(args.runs, f"seed{s}", run)) for s in finished]
    if not all(key_of(c) in r for r in per_seed for c in caps):
      return  # a run from before this model was scored
    models[name] = {c: np.stack([r[key_of(c)] for r in per_seed]) for c in caps}
    models[name][SEEDS_KEY] = finished

  for cap in CAPS:
    collect(f"{cap.capitalize()} expert", "experts", lambda c, cap=cap: f"branch/{cap}/{c}", CAPS)
  # The experts run scores the uniform weight average of its experts too: the same model
  # as the ablation's "no OPD" variant, item for item.
  collect(MERGED, "experts", lambda c: f"merged/{c}", CAPS)
  collect(MERGED_STRONG, STRONG_MERGE, lambda c: f"merged/{c}", CAPS, partial=True)
  collect(MERGED_RETRAINED, "experts_weights", lambda c: f"merged/{c}", CAPS, partial=True)
  for cap in CAPS:  # not table rows: the strong merge's experts-minus-merge reference
    collect(f"{cap.capitalize()} expert{RETRAINED_SUFFIX}", "experts_weights",
            lambda c, cap=cap: f"branch/{cap}/{c}", CAPS, partial=True)
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


def seeds_label(rewards) -> list | None:
  """The seeds a model's rows are (None: seed-independent, or not recorded)."""
  return rewards.get(SEEDS_KEY)


def aligned(a: dict, b: dict, caps) -> tuple[np.ndarray, np.ndarray]:
  """(a f[S, N], b f[S, N] or f[1, N]) over `caps`, on the seeds both finished. Where a
  side does not record its seeds (the base, or hand-built rewards) the rows pair as
  they stand (a seed-independent f[1, N] broadcasts)."""
  ra, rb = overall(a, caps), overall(b, caps)
  sa, sb = seeds_label(a), seeds_label(b)
  if sa is None or sb is None:
    return ra, rb
  common = [s for s in sa if s in sb]
  return ra[[sa.index(s) for s in common]], rb[[sb.index(s) for s in common]]


def compare(a: dict, b: dict, caps) -> dict:
  """a - b over `caps`, paired on items and seeds: {'mean', 'ci95', 'p'} in points (p:
  two-sided, H0 no difference), and 'seeds' (those paired) where both record theirs."""
  ra, rb = aligned(a, b, caps)
  est = stats.estimate(ra - rb)
  out = points(stats.interval(est))
  out["p"] = round(stats.p_value(est), 4)
  if seeds_label(a) is not None and seeds_label(b) is not None:
    out["seeds"] = [s for s in seeds_label(a) if s in seeds_label(b)]
  return out


def accuracy_table(models, caps) -> dict:
  """{model: {cap | 'overall': {'mean', 'ci95'}}} in points ('seeds' when a model has
  finished on a subset of them)."""
  out = {}
  for name, rewards in models.items():
    if not all(c in rewards for c in caps):
      continue
    out[name] = {c: points(stats.mean_ci(rewards[c])) for c in caps}
    out[name]["overall"] = points(stats.mean_ci(overall(rewards, caps)))
    if seeds_label(rewards) is not None:
      out[name]["seeds"] = seeds_label(rewards)
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
    out[name] = {c: compare(rewards, ref, [c]) for c in caps}
    out[name]["overall"] = compare(rewards, ref, caps)
  return out


def transfer_matrix(models) -> dict:
  """{expert capability: {eval capability | 'overall': gain over the base, paired}}."""
  out = {}
  for cap in CAPS:
    name = f"{cap.capitalize()} expert"
    if name in models:
      out[cap] = {c: compare(models[name], models["Base"], [c]) for c in CAPS}
      out[cap]["overall"] = compare(models[name], models["Base"], CAPS)
  return out


# --------------------------------------------------------------------------- claims

ALPHA = 0.05


def _with_holm(diffs: dict) -> dict:
  """diffs {name: compare(...)} -> the same with 'p_holm': Holm-adjusted across them."""
  names = list(diffs)
  adjusted = stats.holm([diffs[n]["p"] for n in names])
  return {n: dict(diffs[n], p_holm=round(p, 4)) for n, p in zip(names, adjusted)}


def _significantly_below(d: dict) -> bool:
  """a - b < 0, Holm-adjusted within its claim."""
  return d["mean"] < 0 and d["p_holm"] < ALPHA


def _at_least(d: dict, margin: float) -> bool:
  """a - b excludes a loss larger than `margin` (95% interval; every such test of a
  claim must hold, an intersection-union test, so no adjustment is needed)."""
  return d["ci95"][0] > -margin


def claims(models) -> dict:
  """The paper's three claims and the merged-experts question, each 'supported' /
  'refuted' / 'inconclusive', with the paired differences behind the verdict (points,
  95% t interval, two-sided p and its Holm adjustment across the tests of the claim that
  can each make the verdict alone). Rules:
  (a) mixed_loses_somewhere: supported if mixed RLVR is significantly below the expert on
      some capability (Holm across the 3); refuted if on every capability the interval
      excludes a loss larger than the margin; else inconclusive.
  (b) mopd_absorbs_less: the same test for the MOPD student against each expert.
  (c) copd_beats_all: supported if merged CoPD is at least each expert on its own
      capability (interval excludes a loss larger than the margin) AND significantly
      above mixed RLVR and MOPD overall (intervals above 0); refuted if some expert is
      significantly better on its capability or mixed RLVR / MOPD is significantly
      better overall (Holm across these 5); else inconclusive.
  (d) copd_beats_merged_experts: supported if merged CoPD is significantly above every
      merge of the independent experts that ran (uniform, strong) overall
      (intervals above 0); refuted if some merge is significantly better (Holm across
      them); else inconclusive.
  The margin is EQUIVALENCE_MARGIN_POINTS; the level 95% (ALPHA)."""
  margin = EQUIVALENCE_MARGIN_POINTS
  out = {}
  experts = [f"{c.capitalize()} expert" for c in CAPS]

  def loses_somewhere(student):
    if student not in models or not all(e in models for e in experts):
      return {"verdict": "inconclusive", "why": f"{student} or an expert has not run"}
    diffs = _with_holm({c: compare(models[student], models[f"{c.capitalize()} expert"], [c])
                        for c in CAPS})
    if any(_significantly_below(d) for d in diffs.values()):
      verdict = "supported"
    elif all(_at_least(d, margin) for d in diffs.values()):
      verdict = "refuted"
    else:
      verdict = "inconclusive"
    return {"verdict": verdict, "minus_expert_points": diffs}

  out["mixed_loses_somewhere"] = loses_somewhere("Mixed RLVR")
  out["mopd_absorbs_less"] = loses_somewhere("MOPD")
  copd = "CoPD (merged)"
  if not all(n in models for n in [copd, "Mixed RLVR", "MOPD"] + experts):
    out["copd_beats_all"] = {"verdict": "inconclusive", "why": "not every method has run"}
  else:
    tests = {f"expert {c}": compare(models[copd], models[f"{c.capitalize()} expert"], [c])
             for c in CAPS}
    tests["mixed overall"] = compare(models[copd], models["Mixed RLVR"], CAPS)
    tests["mopd overall"] = compare(models[copd], models["MOPD"], CAPS)
    tests = _with_holm(tests)
    vs_expert = {c: tests[f"expert {c}"] for c in CAPS}
    if (all(_at_least(d, margin) for d in vs_expert.values())
        and tests["mixed overall"]["ci95"][0] > 0 and tests["mopd overall"]["ci95"][0] > 0):
      verdict = "supported"
    elif any(_significantly_below(d) for d in tests.values()):
      verdict = "refuted"
    else:
      verdict = "inconclusive"
    out["copd_beats_all"] = {"verdict": verdict, "minus_expert_own_points": vs_expert,
                             "minus_mixed_overall_points": tests["mixed overall"],
                             "minus_mopd_overall_points": tests["mopd overall"]}
  merges = [m for m in (MERGED, MERGED_STRONG) if m in models]
  if copd not in models or not merges:
    out["copd_beats_merged_experts"] = {"verdict": "inconclusive",
                                        "why": "CoPD or the merged experts have not run"}
  else:
    diffs = _with_holm({m: compare(models[copd], models[m], CAPS) for m in merges})
    if all(d["ci95"][0] > 0 for d in diffs.values()):
      verdict = "supported"
    elif any(_significantly_below(d) for d in diffs.values()):
      verdict = "refuted"
    else:
      verdict = "inconclusive"
    out["copd_beats_merged_experts"] = {
        "verdict": verdict, "minus_merged_overall_points": diffs,
        "minus_merged_per_capability_points": {
            m: {c: compare(models[copd], models[m], [c]) for c in CAPS} for m in merges},
        "merges_judged": merges}
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


def plot_final(result: dict, out_dir: str) -> None:
  """final_accuracy.png: every three-branch model's held-out accuracy with its 95%
  interval, per capability and overall (the merged experts beside CoPD)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  table = result["accuracy_points"]
  if not table:
    return
  names = list(table)
  fig, axes = plt.subplots(1, len(CAPS) + 1, figsize=(16, 0.35 * len(names) + 1.5), sharey=True)
  for ax, col in zip(axes, list(CAPS) + ["overall"]):
    means = [table[n][col]["mean"] for n in names]
    lows = [table[n][col]["mean"] - table[n][col]["ci95"][0] for n in names]
    highs = [table[n][col]["ci95"][1] - table[n][col]["mean"] for n in names]
    ax.errorbar(means, range(len(names)), xerr=[lows, highs], fmt="o", capsize=3)
    ax.set_title(col)
    ax.grid(axis="x", alpha=0.3)
  axes[0].set_yticks(range(len(names)), names)
  axes[0].invert_yaxis()
  axes[len(CAPS) // 2].set_xlabel(f"held-out accuracy, points (95% interval; seeds {result['seeds']})")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "final_accuracy.png"), dpi=100)
  plt.close(fig)


def fmt_cell(d) -> str:
  """'mean [low, high]' exactly as results.json stores them (no re-rounding)."""
  return f"{d['mean']} [{d['ci95'][0]}, {d['ci95'][1]}]"


def markdown_table(table: dict, caps, title: str) -> str:
  names = list(table)
  lines = [f"| {title} | " + " | ".join(caps) + " | overall |", "|---" * (len(caps) + 2) + "|"]
  for name in names:
    lines.append(f"| {name} | " + " | ".join(fmt_cell(table[name][c]) for c in list(caps) + ["overall"]) + " |")
  return "\n".join(lines)


# ------------------------------------------------------- coverage of the intervals

COVERAGE_REPLICATES = 2000
# The two comparisons the percentile bootstrap was found to under-cover (80-82%).
BOOTSTRAP_CHECKS = (("CoPD (merged)", "MOPD", CAPS), ("CoPD (merged)", "Image expert", ("image",)))


def claim_comparisons(models) -> list[tuple[str, str, tuple]]:
  """(a, b, caps) of every paired comparison the claims judge, for those that ran."""
  pairs = []
  for student in ("Mixed RLVR", "MOPD", "CoPD (merged)"):
    pairs += [(student, f"{c.capitalize()} expert", (c,)) for c in CAPS]
  pairs += [("CoPD (merged)", "Mixed RLVR", CAPS), ("CoPD (merged)", "MOPD", CAPS),
            ("CoPD (merged)", MERGED, CAPS), ("CoPD (merged)", MERGED_STRONG, CAPS)]
  return [(a, b, caps) for a, b, caps in pairs if a in models and b in models]


def coverage_check(models, replicates: int = COVERAGE_REPLICATES) -> dict:
  """Simulated coverage of nominal 95% intervals, per claim comparison: data drawn from
  the comparison's own estimated variance components (seeds, items, residual) at its
  seed and item counts. Also the old percentile bootstrap's, on BOOTSTRAP_CHECKS."""
  rows = []
  for k, (a, b, caps) in enumerate(claim_comparisons(models)):
    ra, rb = aligned(models[a], models[b], caps)
    diff = ra - rb
    if diff.shape[0] < 2:
      continue
    comps = stats.variance_components(diff)
    row = {"comparison": f"{a} − {b} ({'overall' if len(caps) > 1 else caps[0]})",
           "seeds": int(diff.shape[0]), "items": int(diff.shape[1]),
           "components": {k2: float(f"{v:.3g}") for k2, v in comps.items()},
           "coverage": stats.simulate_coverage(comps, *diff.shape, replicates=replicates,
                                               seed=k)}
    if (a, b, tuple(caps)) in BOOTSTRAP_CHECKS:
      row["coverage_percentile_bootstrap"] = stats.simulate_coverage(
          comps, *diff.shape, replicates=replicates // 5, seed=k, method="bootstrap")
    rows.append(row)
  return {"min": min((r["coverage"] for r in rows), default=None),
          "replicates": replicates, "comparisons": rows}


# ------------------------------------------------------------------ the dial study

def dial_levels(runs: str) -> list[dict]:
  """The dial study's levels from the finished runs under `runs` (experiments/dial.py's
  layout), each seed counted once its runs finished; intervals as everywhere here."""
  if not os.path.isdir(runs):
    return []
  import dial
  levels = sorted(float(d[len("conflict"):]) for d in os.listdir(runs) if d.startswith("conflict"))
  seeds = sorted({int(d[len("seed"):]) for lv in levels
                  for d in os.listdir(os.path.join(runs, dial.level_name(lv))) if d.startswith("seed")})
  out = []
  for level in levels:
    entry = dial.level_report(level, seeds, argparse.Namespace(runs=runs))
    gap = entry["merged_experts_own_gap_points"]
    out.append({
        "level": level, "seeds": entry["seeds"],
        "expert_divergence_sym_kl": entry["expert_divergence_sym_kl"],
        "expert_divergence_sym_kl_per_seed": entry["expert_divergence_sym_kl_per_seed"],
        "merged_experts_own_gap_points": None if gap is None else {
            k: gap[k] for k in ("mean", "ci95", "seeds", "per_capability")},
        "copd_minus_merged_experts": entry["copd_minus_merged_experts"],
        "copd_minus_merged_experts_seeds": (entry["copd_minus_merged_experts_detail"] or {}).get("seeds"),
        "mopd_minus_experts": entry["mopd_minus_experts"],
        "mopd_minus_experts_seeds": (entry["mopd_minus_experts_detail"] or {}).get("seeds"),
        "copd_minus_merged_experts_per_seed":
            (entry["copd_minus_merged_experts_detail"] or {}).get("per_seed"),
        "copd_minus_mopd": entry["copd_minus_mopd"],
        "copd_minus_mixed_rlvr": entry["copd_minus_mixed_rlvr"],
        "copd_opd_heavy_minus_merged_experts": entry["copd_opd_heavy_minus_merged_experts"],
        "copd_opd_heavy_minus_copd": entry["copd_opd_heavy_minus_copd"],
        "accuracy_points": entry["accuracy_points"]})
  return out


# ------------------------------------------------------------------------ the results

def merged_row(table: dict, models, name: str, experts_suffix: str = "") -> dict | None:
  """A merge's accuracy row (per capability and overall, with intervals) and its gap to
  the experts it merged on their own capabilities (experts − merge, paired); the experts
  are '<Cap> expert<experts_suffix>' (RETRAINED_SUFFIX: the retrained ones)."""
  if name not in table:
    return None
  row = dict(table[name])
  experts = [f"{c.capitalize()} expert{experts_suffix}" for c in CAPS]
  if all(e in models for e in experts):
    row["experts_minus_merged_own_points"] = {
        c: compare(models[e], models[name], [c]) for c, e in zip(CAPS, experts)}
  return row


def strong_merge_details(args, seeds) -> dict:
  """Per seed: the scale chosen, every scale's validation accuracy, and (experts retrained
  for their weights) how far their held-out rewards agree with the committed run's."""
  out = {}
  for seed in seeds:
    path = os.path.join(args.runs, f"seed{seed}", STRONG_MERGE, "summary.json")
    if os.path.exists(path):
      with open(path) as f:
        s = json.load(f)
      out[str(seed)] = {k: s.get(k) for k in ("chosen", "validation_accuracy",
                                              "experts_retrained_for_weights",
                                              "held_out_rewards_equal_to_reference")}
  return out


def write_results(args, seeds, done, command, minutes, out_dir) -> dict:
  models = model_rewards(args, seeds, done)
  everything = {k: v for k, v in models.items() if all(c in v for c in CAPS)}
  three = {k: v for k, v in everything.items() if not k.endswith(RETRAINED_SUFFIX)}
  two = {k: v for k, v in models.items() if k in ("Base", "Image expert", "Text expert")
         or set(v) - {SEEDS_KEY} == set(TWO)}
  own_gain = {c: compare(models[f"{c.capitalize()} expert"], models["Base"], [c])
              for c in CAPS if f"{c.capitalize()} expert" in models}
  table = accuracy_table(three, CAPS)
  detail = claims(three)
  result = {
      "command": command, "minutes": round(minutes, 1), "quick": args.quick,
      "eval_examples_per_capability": args.eval_examples, "seeds": seeds,
      "runs_finished": sorted(f"seed{s}/{r}" for s, r in done),
      "interval_method": stats.INTERVAL_METHOD,
      "multiple_comparisons": "Holm across the tests inside each claim that can each make "
                              "its verdict alone (p_holm); 'every ...' conditions are "
                              "intersection-union tests at 95%, unadjusted",
      "expert_own_gain_points": {c: d["mean"] for c, d in own_gain.items()},
      "expert_own_gain_ci95": {c: d["ci95"] for c, d in own_gain.items()},
      "expert_pair_overlap_final": final_overlap(args, seeds, "experts"),
      "copd_pair_overlap_final": final_overlap(args, seeds, "copd"),
      "transfer_matrix_points": transfer_matrix(models),
      "accuracy_points": table,
      "merged_experts": merged_row(table, three, MERGED),
      "merged_experts_strong": merged_row(table, everything, MERGED_STRONG, RETRAINED_SUFFIX),
      "merged_experts_retrained_uniform": merged_row(table, everything, MERGED_RETRAINED,
                                                     RETRAINED_SUFFIX),
      "merged_experts_strong_minus_retrained_uniform": (
          {c: compare(three[MERGED_STRONG], three[MERGED_RETRAINED], [c]) for c in CAPS}
          | {"overall": compare(three[MERGED_STRONG], three[MERGED_RETRAINED], CAPS)}
          if MERGED_STRONG in three and MERGED_RETRAINED in three else None),
      "merged_experts_strong_by_seed": strong_merge_details(args, seeds),
      "minus_copd_points": paired_to(three, "CoPD (merged)", CAPS),
      "accuracy_points_two_branch": accuracy_table(two, TWO),
      "minus_copd_two_branch_points": paired_to(two, "CoPD 2-branch (merged)", TWO),
      "claims": {k: v["verdict"] for k, v in detail.items()},
      "claims_detail": detail,
  }
  coverage = coverage_check(three) if not args.quick else {"min": None, "comparisons": []}
  result["interval_coverage_simulated"] = coverage["min"]
  result["interval_coverage_simulated_detail"] = coverage
  result["dial"] = (dial_levels(args.dial_runs)
                    if getattr(args, "dial_runs", None) and not args.quick else [])
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  try:
    plot(args, seeds, out_dir)
    plot_final(result, out_dir)
    if result["dial"]:
      import dial
      dial.plot({"dial": result["dial"]}, out_dir)
  except ImportError:
    print("matplotlib not installed (pip install -e '.[plots]'): no plots", flush=True)
  import results_doc
  doc = args.doc or os.path.join(out_dir, "RESULTS.md")
  results_doc.write(doc, result, out_dir, CAPS, TWO)
  if getattr(args, "readme", None):  # the README's results paragraph, from these reports
    import readme_results
    readme_results.update(args.readme, result, out_dir)
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
  parser.add_argument("--dial_runs", default="experiments/results/dial/runs",
                      help="the dial study's runs (experiments/dial.py), read for results.json "
                           "'dial'; '' leaves it out")
  parser.add_argument("--doc", default=None,
                      help="the results document to write (default experiments/RESULTS.md for "
                           "the default --out, else <out>/RESULTS.md)")
  parser.add_argument("--readme", default=None,
                      help="a README whose results block (experiments/readme_results.py) "
                           "to rewrite (default README.md for the default --out; '' none)")
  args = parser.parse_args(argv)
  seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
  args.eval_examples = args.eval_examples or (300 if args.quick else 1000)
  args.out = args.out or ("experiments/results/quick" if args.quick else "experiments/results")
  args.runs = args.runs or ("runs/reproduce_quick" if args.quick else "experiments/results/runs")
  args.runs = run_archive.runs_dir(args.runs, args.report_only)  # an earlier recipe's .tar.xz
  if args.doc is None and os.path.normpath(args.out) == os.path.normpath("experiments/results"):
    args.doc = "experiments/RESULTS.md"
    if args.readme is None and not args.quick:
      args.readme = "README.md"
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
        if method == STRONG_MERGE:
          strong_merge(seed, args)
        else:
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
