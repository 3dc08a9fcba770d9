"""The divergence dial (issue 26): where does merging independent experts fail, and does
CoPD keep its branches mergeable there?

    python experiments/dial.py [--levels 0,0.5,1] [--seeds 0,1,2,3,4] [--eval_examples 500]
        [--set field=value ...] [--report_only]

Two capability families, `total` ('add up 40,3,2?') and `remain` ('from 40 take 3,2?'),
conflict on a share of their prompts: at dial level c (config.data.conflict) a fraction c
of each family's RL and held-out prompts take a shared surface form ('t:40,3,2?' /
'r:40,3,2?') in which the one-letter cue alone says whether to add or subtract, and the
base's demonstrations ignore that cue (copd_jax/data/toy_tasks.py, "Conflict"). One base
serves every level. Per level and seed this runs:
  - experts: one branch per family, trained apart (method `experts`);
  - merged experts: the uniform average of those experts' weights, scored here;
  - mixed RLVR, MOPD (from those experts) and CoPD (2 branches, hub = total);
  - with `--only copd_opd_heavy`: CoPD with an S_RL : S_OPD = 1 : 2 schedule;
and records each model's per-item rewards (eval_rewards.npz), plus the experts'
divergence: symmetric KL between the two expert policies, teacher-forced on the reference
solutions of fixed diagnostic prompts (64 validation items per family at conflict 0.5,
the same prompts at every level and seed; divergence.json in the experts' run directory).

Resumable as experiments/reproduce.py (same run directories, same checks): a finished run
is read, not rerun, a killed run resumes from its checkpoints, and the report
(<out>/dial.json, dial.md) is rewritten after every run. `--report_only` rewrites it from
the finished runs and runs nothing. Runs go seed by seed (every level and method of seed
0 first), so a partial study already has whole seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402  (config building, run_or_load, rewards, intervals)

import stats  # noqa: E402  (experiments/stats.py)
from copd_jax.config_lib import spec_of

CAPS = ("total", "remain")
HUB = "total"
METHODS = ("experts", "mixed_rlvr", "mopd", "copd")
# Run only when named in --only: CoPD with twice as many OPD as RL steps in each cycle
# (S_RL : S_OPD = 1 : 2, the ablation sweep's most-OPD schedule; the reference is 3 : 2),
# to ask whether more distillation lets CoPD's branches learn the other family where the
# families' prompts look alike.
EXTRA_METHODS = ("copd_opd_heavy",)
OPD_HEAVY = dict(rl__opd__schedule__s_rl=1, rl__opd__schedule__s_opd=2)
DIAGNOSTIC_PROMPTS = 64  # per family, validation split
DIAGNOSTIC_CONFLICT = 0.5  # the probe's mix of forms, fixed across levels
# Every run of the dial (base included): the conflict pair only, text prompts (32 tokens
# hold the longest prompt), half the base's demonstrations flawed, so that in the shared
# form the cue says nothing about the procedure the base demonstrates.
DIAL_FIELDS = dict(
    tasks__capabilities=CAPS, tasks__difficulty={c: 1 for c in CAPS},
    warm_start__mix={c: 1.0 for c in CAPS}, warm_start__flaw_rate={c: 0.5 for c in CAPS},
    warm_start__steps=600,  # two text families: 12k demonstrations each (1,500 = 80 min here)
    data__max_prompt_len=32, rl__capabilities=CAPS, rl__opd__hub=HUB,
    rl__static_opd__teacher="total", rl__static_opd__student="remain",
    rl__eval_every=20)


def level_name(level: float) -> str:
  return f"conflict{level:g}"


def dial_config(method: str, seed: int, workdir: str, args, level: float, **overrides):
  """reproduce.make_config with the dial's fields, the level and any --set recipe."""
  fields = dict(DIAL_FIELDS, data__conflict=float(level))
  fields["num_experts"] = 1 if method in ("base", "mixed_rlvr") else len(CAPS)
  fields.update(overrides)
  return reproduce.make_config(method, seed, workdir, args, **fields)


def base_config(args):
  # The base is the same for every level (the dial changes RL and evaluation only).
  return dial_config("base", 0, os.path.join(args.runs, "base"), args, 0.0)


def seed_plan(level: float, seed: int, args) -> dict:
  """name -> (method, overrides, workdir) of one level and seed, in run order."""
  root = os.path.join(args.runs, level_name(level), f"seed{seed}")
  experts_dir = os.path.join(root, "experts")
  # MOPD distils from this seed's experts when their weights are on disk; in a fresh
  # clone (only small files are committed) it retrains them from the same seed.
  reuse = (dict(rl__experts_dir=experts_dir)
           if os.path.exists(os.path.join(experts_dir, "final_params")) else {})
  runs = {"experts": ("experts", {}), "copd": ("copd", {}), "mopd": ("mopd", reuse),
          "mixed_rlvr": ("mixed_rlvr", {}), "copd_opd_heavy": ("copd", OPD_HEAVY)}
  return {name: (m, o, os.path.join(root, name)) for name, (m, o) in runs.items()}


def run_order(levels, seeds, args):
  """(level, seed, name) in the order they run: seed by seed; within a seed the experts
  of every level first (the dial's own measurement), then the other methods."""
  for seed in seeds:
    for name in METHODS + EXTRA_METHODS:
      for level in sorted(levels, reverse=True):
        yield level, seed, name


# ------------------------------------------------- after the experts: merge, divergence

def _load_experts(cfg, workdir):
  """(setup, stacked expert params [E, ...]) of a finished experts run."""
  import jax
  from copd_jax import checkpoint, policy_setup
  from copd_jax.models import stacked as stacked_lib
  setup = policy_setup.build_setup(spec_of(cfg))
  directory = os.path.join(workdir, "final_params")
  stored = tuple(checkpoint.read_metadata(directory).get("branches", ()))
  if stored != CAPS:
    raise SystemExit(f"{directory} holds experts {stored}, expected {CAPS}")
  abstract = jax.eval_shape(lambda: stacked_lib.broadcast_params(
      policy_setup.init_policy_params(setup.model_cfg, jax.random.key(0)), len(CAPS)))
  return setup, checkpoint.load_policy(directory, abstract)


def score_merged_experts(cfg, experts_dir: str, out_dir: str) -> None:
  """Uniform weight average of the experts, scored on the run's held-out items; writes
  <out_dir>/eval_rewards.npz ('merged/<cap>') and summary.json."""
  import jax
  from copd_jax import policy_setup
  from copd_jax.models import stacked as stacked_lib
  from copd_jax.rl import evaluation
  setup, stacked = _load_experts(cfg, experts_dir)
  merged = jax.tree.map(lambda x: x[None], stacked_lib.merge(stacked, None))
  eval_sets = policy_setup.held_out_sets(spec_of(cfg), setup)
  rewards = {}
  from copd_jax.rl import methods
  accuracy = evaluation.evaluate_stacked(merged, setup, eval_sets, rewards_out=rewards,
                                         run=methods.run_sharding(spec_of(cfg), setup.model_cfg),
                                         max_new_tokens=cfg.sampling.max_new_tokens,
                                         batch_size=cfg.eval.batch_size)
  os.makedirs(out_dir, exist_ok=True)
  evaluation.save_eval_rewards(os.path.join(out_dir, "eval_rewards.npz"),
                               {"merged": {c: r[0] for c, r in rewards.items()}})
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump({"method": "merged_experts", "experts": experts_dir, "weights": "uniform",
               "merged": {k: float(v[0]) for k, v in accuracy.items()}}, f, indent=1)


def diagnostic_examples(cfg, setup) -> list:
  """The fixed probe: DIAGNOSTIC_PROMPTS validation items per family at conflict 0.5."""
  from copd_jax.data import toy_tasks
  return [toy_tasks.make_example(cap, i, seed=cfg.tasks.seed, difficulty=cfg.tasks.difficulty[cap],
                                 split="validation", conflict=DIAGNOSTIC_CONFLICT,
                                 image_size=setup.example_kwargs["image_size"],
                                 num_frames=setup.example_kwargs["num_frames"])
          for cap in CAPS for i in range(DIAGNOSTIC_PROMPTS)]


def symmetric_kl(log_p, log_q, weights):
  """Mean over weighted positions of KL(p||q) + KL(q||p) = sum_v (p - q)(log p - log q).
  log_p, log_q: f32[B, T, V]; weights: f32[B, T] -> (f32[B] per row, its row weights)."""
  per_position = np.sum((np.exp(log_p) - np.exp(log_q)) * (log_p - log_q), axis=-1)
  totals = np.sum(per_position * weights, axis=1)
  return totals, np.sum(weights, axis=1)


def expert_divergence(cfg, experts_dir: str) -> dict:
  """Symmetric KL between the two experts, teacher-forced on the reference solutions of
  the fixed probe (response tokens only): overall, per family, per form."""
  import jax
  import jax.numpy as jnp
  from copd_jax.data import toy_tasks
  from copd_jax.models import decoder
  setup, stacked = _load_experts(cfg, experts_dir)
  probes = diagnostic_examples(cfg, setup)
  batch = setup.encode_sft_batch(probes)
  tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
  frames = None if batch["frames"] is None else jnp.asarray(batch["frames"])
  log_probs = []
  for k in range(len(CAPS)):
    params = jax.tree.map(lambda x, k=k: x[k], stacked)
    hidden = decoder.forward_hidden(params, setup.model_cfg, tokens,
                                    decoder.positions_from_mask(mask), mask, frames)
    logits = decoder.logits_from_hidden(hidden[:, :-1], decoder.lm_head(params, setup.model_cfg))
    log_probs.append(np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1),
                                np.float64))
  totals, counts = symmetric_kl(log_probs[0], log_probs[1], batch["loss_mask"][:, :-1])

  def mean_over(rows):
    rows = np.asarray(rows, bool)
    return float(totals[rows].sum() / counts[rows].sum()) if rows.any() else None

  shared = np.array([toy_tasks.is_shared_form(ex) for ex in probes])
  caps = np.array([ex.capability for ex in probes])
  return {"sym_kl": mean_over(np.ones(len(probes))),
          "sym_kl_shared_form": mean_over(shared), "sym_kl_distinct_form": mean_over(~shared),
          **{f"sym_kl/{c}": mean_over(caps == c) for c in CAPS},
          "probe": f"{DIAGNOSTIC_PROMPTS} validation items per family at conflict "
                   f"{DIAGNOSTIC_CONFLICT} ({int(shared.sum())} in the shared form), "
                   "teacher-forced on the reference solutions"}


def after_experts(cfg, experts_dir: str, merged_dir: str) -> None:
  """The merged experts' scores and the experts' divergence, once (needs their weights)."""
  need_merge = not os.path.exists(os.path.join(merged_dir, "summary.json"))
  divergence_path = os.path.join(experts_dir, "divergence.json")
  need_divergence = not os.path.exists(divergence_path)
  if not (need_merge or need_divergence):
    return
  if not os.path.exists(os.path.join(experts_dir, "final_params")):
    print(f"!! {experts_dir}: no expert weights on disk (a fresh clone?); delete its "
          "summary.json to retrain them, then rerun", flush=True)
    return
  if need_merge:
    score_merged_experts(cfg, experts_dir, merged_dir)
  if need_divergence:
    divergence = expert_divergence(cfg, experts_dir)
    with open(divergence_path, "w") as f:
      json.dump(divergence, f, indent=1)
  print(f"== merged experts and divergence -> {merged_dir}", flush=True)


# ------------------------------------------------------------------------- the report

MIXED_BRANCH = "+".join(CAPS)


def _rewards_if_done(workdir: str):
  done = all(os.path.exists(os.path.join(workdir, f)) for f in ("summary.json", "eval_rewards.npz"))
  return reproduce.load_rewards(workdir) if done else None


def _other(cap: str) -> str:
  return next(c for c in CAPS if c != cap)


def level_models(level: float, seeds, args) -> tuple[dict, dict]:
  """({model: {seed: {cap: f32[N]}}}, {seed: divergence}) of the finished runs of a level."""
  keys = {"Experts (own capability)": ("experts", lambda c: f"branch/{c}/{c}"),
          "Merged experts": ("merged_experts", lambda c: f"merged/{c}"),
          "Mixed RLVR": ("mixed_rlvr", lambda c: f"branch/{MIXED_BRANCH}/{c}"),
          "MOPD": ("mopd", lambda c: f"branch/student/{c}"),
          "CoPD (merged)": ("copd", lambda c: f"merged/{c}"),
          # Each family's items answered by the branch trained on the other family: does
          # a branch learn the other's skill (CoPD's OPD) or stay a specialist?
          "Experts (other family)": ("experts", lambda c: f"branch/{_other(c)}/{c}"),
          "CoPD branches (other family)": ("copd", lambda c: f"branch/{_other(c)}/{c}"),
          "CoPD 1:2 (merged)": ("copd_opd_heavy", lambda c: f"merged/{c}"),
          "CoPD 1:2 branches (other family)":
              ("copd_opd_heavy", lambda c: f"branch/{_other(c)}/{c}")}
  models, divergence = {name: {} for name in keys}, {}
  for seed in seeds:
    root = os.path.join(args.runs, level_name(level), f"seed{seed}")
    for name, (run, key_of) in keys.items():
      rewards = _rewards_if_done(os.path.join(root, run))
      if rewards is not None and all(key_of(c) in rewards for c in CAPS):
        models[name][seed] = {c: rewards[key_of(c)] for c in CAPS}
    path = os.path.join(root, "experts", "divergence.json")
    if os.path.exists(path):
      with open(path) as f:
        divergence[seed] = json.load(f)
  return models, divergence


def _stack(per_seed: dict, seeds) -> dict:
  return {c: np.stack([per_seed[s][c] for s in seeds]) for c in CAPS}


def _difference(models, a: str, b: str) -> dict | None:
  """a - b over both capabilities, paired on the seeds both finished: points with a 95%
  interval (experiments/stats.py: seeds x items), as {'mean', 'ci95', 'seeds',
  'per_capability', 'per_seed' (each seed's mean difference, points)}."""
  seeds = sorted(set(models[a]) & set(models[b]))
  if not seeds:
    return None
  ra, rb = _stack(models[a], seeds), _stack(models[b], seeds)
  overall_a, overall_b = reproduce.overall(ra, CAPS), reproduce.overall(rb, CAPS)
  out = reproduce.points(stats.paired_difference_ci(overall_a, overall_b))
  out["per_capability"] = {c: reproduce.points(stats.paired_difference_ci(ra[c], rb[c]))
                           for c in CAPS}
  out["seeds"] = seeds
  per_seed = (overall_a - overall_b).mean(axis=-1)
  out["per_seed"] = {str(s): round(100 * float(d), 2) for s, d in zip(seeds, per_seed)}
  return out


def _triple(d) -> list | None:
  return None if d is None else [d["mean"], *d["ci95"]]


def level_report(level: float, seeds, args) -> dict:
  models, divergence = level_models(level, seeds, args)
  accuracy = {}
  for name, per_seed in models.items():
    if per_seed:
      done = sorted(per_seed)
      rewards = _stack(per_seed, done)
      accuracy[name] = {c: reproduce.points(stats.mean_ci(rewards[c])) for c in CAPS}
      accuracy[name]["overall"] = reproduce.points(stats.mean_ci(reproduce.overall(rewards, CAPS)))
      accuracy[name]["seeds"] = done
  gap = _difference(models, "Experts (own capability)", "Merged experts")
  copd_vs_merged = _difference(models, "CoPD (merged)", "Merged experts")
  mopd_vs_experts = _difference(models, "MOPD", "Experts (own capability)")
  copd_vs_mopd = _difference(models, "CoPD (merged)", "MOPD")
  copd_vs_mixed = _difference(models, "CoPD (merged)", "Mixed RLVR")
  heavy_vs_merged = _difference(models, "CoPD 1:2 (merged)", "Merged experts")
  heavy_vs_copd = _difference(models, "CoPD 1:2 (merged)", "CoPD (merged)")
  kl = [divergence[s]["sym_kl"] for s in sorted(divergence)]
  return {
      "level": level, "conflict": level,
      "seeds": sorted(set(models["Experts (own capability)"]) & set(models["Merged experts"])),
      "expert_divergence_sym_kl": float(np.mean(kl)) if kl else None,
      "expert_divergence_sym_kl_per_seed": {str(s): divergence[s]["sym_kl"] for s in sorted(divergence)},
      "expert_divergence_detail": {str(s): d for s, d in sorted(divergence.items())},
      "merged_experts_own_gap_points": gap,
      "copd_minus_merged_experts": _triple(copd_vs_merged),
      "mopd_minus_experts": _triple(mopd_vs_experts),
      "copd_minus_merged_experts_detail": copd_vs_merged,
      "mopd_minus_experts_detail": mopd_vs_experts,
      "copd_minus_mopd": _triple(copd_vs_mopd),
      "copd_minus_mixed_rlvr": _triple(copd_vs_mixed),
      "copd_minus_mopd_detail": copd_vs_mopd,
      "copd_minus_mixed_rlvr_detail": copd_vs_mixed,
      "copd_opd_heavy_minus_merged_experts": _triple(heavy_vs_merged),
      "copd_opd_heavy_minus_copd": _triple(heavy_vs_copd),
      "accuracy_points": accuracy,
  }


def plot(report: dict, out_dir: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for key, label in (("copd_minus_merged_experts", "CoPD − merged experts"),
                     ("mopd_minus_experts", "MOPD − experts (own capability)"),
                     ("merged_experts_own_gap_points", "experts − merged experts")):
    xs, ys, lows, highs, names = [], [], [], [], []
    for entry in report["dial"]:
      value = entry[key]
      if isinstance(value, dict):
        value = _triple(value)
      if value is None or entry["expert_divergence_sym_kl"] is None:
        continue
      xs.append(entry["expert_divergence_sym_kl"])
      ys.append(value[0])
      lows.append(value[0] - value[1])
      highs.append(value[2] - value[0])
      names.append(f"c={entry['level']:g}")
    if xs:
      ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, label=label)
      for x, y, n in zip(xs, ys, names):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.axhline(0, color="grey", lw=0.5)
  ax.set_xlabel("experts' symmetric KL on the fixed probe (mean over seeds)")
  ax.set_ylabel("points (95% interval)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "dial.png"), dpi=100)
  plt.close(fig)


def _cell(triple) -> str:
  return "not run yet" if triple is None else f"{triple[0]:.1f} [{triple[1]:.1f}, {triple[2]:.1f}]"


def write_report(args, levels, seeds, command: str, minutes: float) -> dict:
  report = {"command": command, "minutes_this_invocation": round(minutes, 1),
            "capabilities": CAPS, "eval_examples_per_capability": args.eval_examples,
            "seeds_asked": seeds, "levels": levels,
            "divergence_probe": f"{DIAGNOSTIC_PROMPTS} validation items per family at "
                                f"conflict {DIAGNOSTIC_CONFLICT}",
            "dial": [level_report(level, seeds, args) for level in levels]}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "dial.json"), "w") as f:
    json.dump(report, f, indent=1)
  lines = [f"# The divergence dial\n\nMade by `{command}`; {args.eval_examples} held-out items "
           "per family; cells: accuracy in points, mean over the seeds finished [95% "
           "interval over seeds and items, experiments/stats.py].\n"]
  for entry in report["dial"]:
    lines.append(f"## conflict = {entry['level']:g} (seeds {entry['seeds']})\n")
    kl = entry["expert_divergence_sym_kl"]
    lines.append(f"- experts' symmetric KL on the probe: {'—' if kl is None else f'{kl:.3f}'}")
    lines.append(f"- experts − merged experts (own capabilities): "
                 f"{_cell(_triple(entry['merged_experts_own_gap_points']))}")
    lines.append(f"- CoPD − merged experts: {_cell(entry['copd_minus_merged_experts'])}")
    lines.append(f"- MOPD − experts (own capabilities): {_cell(entry['mopd_minus_experts'])}")
    lines.append(f"- CoPD − MOPD: {_cell(entry['copd_minus_mopd'])}; CoPD − mixed RLVR: "
                 f"{_cell(entry['copd_minus_mixed_rlvr'])}")
    if entry["copd_opd_heavy_minus_copd"] is not None:
      lines.append(f"- CoPD 1:2 − merged experts: "
                   f"{_cell(entry['copd_opd_heavy_minus_merged_experts'])}; CoPD 1:2 − CoPD: "
                   f"{_cell(entry['copd_opd_heavy_minus_copd'])}")
    lines.append("")
    table = {k: v for k, v in entry["accuracy_points"].items()}
    if table:
      lines.append("| model | " + " | ".join(CAPS) + " | overall | seeds |")
      lines.append("|---" * (len(CAPS) + 3) + "|")
      for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(reproduce.fmt_cell(row[c]) for c in (*CAPS, "overall"))
                     + f" | {row['seeds']} |")
      lines.append("")
  with open(os.path.join(args.out, "dial.md"), "w") as f:
    f.write("\n".join(lines))
  try:
    plot(report, args.out)
  except ImportError:
    print("matplotlib not installed: no plot", flush=True)
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--levels", default="0,0.5,1", help="dial levels (data.conflict)")
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--only", default="",
                      help=f"comma-separated subset of {METHODS + EXTRA_METHODS} (the last "
                           "runs only when named)")
  parser.add_argument("--runs", default="experiments/results/dial/runs")
  parser.add_argument("--out", default="experiments/results/dial")
  reproduce.add_rerun_arguments(parser, "dial.{json,md}")
  parser.set_defaults(eval_examples=500, base_dir="experiments/results/dial/runs/base_policy")
  args = parser.parse_args(argv)
  args.quick, args.quick_steps = False, 0
  levels = [float(x) for x in args.levels.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  only = [m for m in args.only.split(",") if m]
  wanted = only or METHODS  # the extra methods run only when named
  unknown = set(only) - set(METHODS + EXTRA_METHODS)
  if unknown:
    raise SystemExit(f"--only takes methods of {METHODS + EXTRA_METHODS}, got {sorted(unknown)}")
  command = reproduce.command_line("dial.py", argv)
  start = time.perf_counter()
  if args.report_only:
    report = write_report(args, levels, seeds, command, 0.0)
  else:
    reproduce.run_or_load(base_config(args))
    report = write_report(args, levels, seeds, command, 0.0)
    for level, seed, name in run_order(levels, seeds, args):
      if name not in wanted:
        continue
      method, overrides, workdir = seed_plan(level, seed, args)[name]
      cfg = dial_config(method, seed, workdir, args, level, **overrides)
      reproduce.run_or_load(cfg)
      if name == "experts":
        after_experts(cfg, workdir, os.path.join(os.path.dirname(workdir), "merged_experts"))
      report = write_report(args, levels, seeds, command, (time.perf_counter() - start) / 60)
  print(json.dumps([{k: e[k] for k in ("level", "seeds", "expert_divergence_sym_kl",
                                       "merged_experts_own_gap_points", "copd_minus_merged_experts",
                                       "mopd_minus_experts")} for e in report["dial"]],
                   default=str))


if __name__ == "__main__":
  main()
