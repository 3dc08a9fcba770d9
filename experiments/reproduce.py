"""Reproduce the paper's comparison on the toy suite.

    python experiments/reproduce.py [--seeds 0,1,2] [--quick] [--out experiments/results]

From the one shared base policy (trained once, or reused), for every seed: three
single-capability experts, mixed RLVR, MOPD and CoPD (three branches, hub = text), and in
a two-branch text + image run static OPD both ways and CoPD. Writes to --out:
  results.md            tables laid out like the paper's (mean ± std over seeds)
  results.json          every run's summary
  accuracy_vs_step.png  held-out accuracy per capability against step, per method
  overlap_vs_step.png   top-10 overlap against step: CoPD branches vs independent experts
All runs go through copd_jax.main.run in this one process (compiled steps are reused).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from copd_jax import default_config  # noqa: E402
from copd_jax import main as main_lib  # noqa: E402

CAPS = ("text", "image", "video")


def make_config(method: str, seed: int, workdir: str, args, **overrides):
  cfg = default_config.get(method, "toy")
  cfg.seed = seed
  cfg.workdir = workdir
  cfg.warm_start.checkpoint_dir = args.base_dir
  if args.quick:
    cfg.rl.steps = cfg.rl.distill_steps = 10
    cfg.rl.eval_every = 5
    cfg.eval.num_examples = 64
  for field, value in overrides.items():  # keyword `a__b` sets config field a.b
    default_config.set_field(cfg, field.replace("__", "."), value)
  return cfg


def run(cfg) -> dict:
  start = time.perf_counter()
  summary = main_lib.run(cfg)
  print(f"== {cfg.method} seed {cfg.seed}: {time.perf_counter() - start:.0f}s -> {cfg.workdir}",
        flush=True)
  return summary


def run_seed(seed: int, args) -> dict:
  root = os.path.join(args.runs, f"seed{seed}")
  out = {}
  out["experts"] = run(make_config("experts", seed, f"{root}/experts", args))
  experts_dir = f"{root}/experts"
  out["mixed_rlvr"] = run(make_config("mixed_rlvr", seed, f"{root}/mixed_rlvr", args))
  out["mopd"] = run(make_config("mopd", seed, f"{root}/mopd", args, rl__experts_dir=experts_dir))
  out["copd"] = run(make_config("copd", seed, f"{root}/copd", args))
  two = dict(rl__capabilities=("text", "image"), num_experts=2)
  out["static_opd_text_to_image"] = run(make_config(
      "static_opd", seed, f"{root}/static_opd_t2i", args, rl__experts_dir=experts_dir))
  out["static_opd_image_to_text"] = run(make_config(
      "static_opd", seed, f"{root}/static_opd_i2t", args, rl__experts_dir=experts_dir,
      rl__static_opd__teacher="image", rl__static_opd__student="text"))
  out["copd_2branch"] = run(make_config("copd", seed, f"{root}/copd_2branch", args, **two))
  return out


def mean_std(values) -> str:
  values = 100 * np.asarray(values, np.float64)
  return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def columns_three(base: dict, per_seed: list[dict]):
  """(column name, list over seeds of {cap: accuracy}) for the three-branch table."""
  cols = [("Base", [base] * len(per_seed))]
  for cap in ("image", "text", "video"):
    cols.append((f"{cap.capitalize()} expert", [s["experts"]["branches"][cap] for s in per_seed]))
  cols.append(("Mixed RLVR", [s["mixed_rlvr"]["final"] for s in per_seed]))
  cols.append(("MOPD", [s["mopd"]["final"] for s in per_seed]))
  cols.append(("CoPD (merged)", [s["copd"]["final"] for s in per_seed]))
  for cap in ("text", "image", "video"):
    cols.append((f"CoPD {cap} branch", [s["copd"]["branches"][cap] for s in per_seed]))
  return cols


def columns_two(base: dict, per_seed: list[dict]):
  two = lambda d: {**d, "accuracy/overall": float(np.mean([d["accuracy/text"], d["accuracy/image"]]))}
  cols = [("Base", [two(base)] * len(per_seed))]
  for cap in ("image", "text"):
    cols.append((f"{cap.capitalize()} expert", [two(s["experts"]["branches"][cap]) for s in per_seed]))
  cols.append(("Static OPD text→image", [s["static_opd_text_to_image"]["final"] for s in per_seed]))
  cols.append(("Static OPD image→text", [s["static_opd_image_to_text"]["final"] for s in per_seed]))
  cols.append(("CoPD (merged)", [s["copd_2branch"]["final"] for s in per_seed]))
  return cols


def table(cols, caps) -> str:
  head = "| capability | " + " | ".join(name for name, _ in cols) + " |"
  sep = "|---" * (len(cols) + 1) + "|"
  lines = [head, sep]
  for cap in list(caps) + ["overall"]:
    cells = [mean_std([d[f"accuracy/{cap}"] for d in runs]) for _, runs in cols]
    best = max(range(len(cols)), key=lambda i: np.mean([d[f"accuracy/{cap}"] for d in cols[i][1]]))
    cells[best] = f"**{cells[best]}**"
    lines.append(f"| {cap.capitalize()} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def plot(args, seeds):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = {  # method -> (run dir, metric key pattern per capability)
      "experts (own capability)": ("experts", "eval/{cap}/accuracy/{cap}"),
      "mixed RLVR": ("mixed_rlvr", "eval/text+image+video/accuracy/{cap}"),
      "CoPD merged": ("copd", "eval/merged/accuracy/{cap}"),
      "MOPD student": ("mopd", "eval/student/accuracy/{cap}"),
  }
  fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
  for ax, cap in zip(axes, CAPS):
    for label, (run_dir, pattern) in curves.items():
      key = pattern.format(cap=cap)
      steps, values = [], []
      for seed in seeds:
        recs = [r for r in read_jsonl(f"{args.runs}/seed{seed}/{run_dir}/metrics.jsonl") if key in r]
        steps.append([r["step"] for r in recs])
        values.append([r[key] for r in recs])
      n = min(len(v) for v in values)
      if n == 0:
        continue
      ax.plot(steps[0][:n], np.mean([v[:n] for v in values], 0), marker="o", label=label)
    ax.set_title(f"{cap}: held-out accuracy (prefix, mean over seeds)")
    ax.set_xlabel("optimizer step (MOPD: after its experts stage)")
  axes[0].set_ylabel("accuracy")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "accuracy_vs_step.png"), dpi=100)

  fig, ax = plt.subplots(figsize=(7, 4))
  for run_dir, key, label in (("copd", "eval/overlap/branches_mean", "CoPD: between branches"),
                              ("experts", "eval/overlap/branches_mean", "experts: between branches"),
                              ("copd", "eval/overlap/with_base_mean", "CoPD: with base"),
                              ("experts", "eval/overlap/with_base_mean", "experts: with base")):
    series = []
    for seed in seeds:
      recs = [r for r in read_jsonl(f"{args.runs}/seed{seed}/{run_dir}/metrics.jsonl") if key in r]
      series.append(([r["step"] for r in recs], [r[key] for r in recs]))
    n = min(len(s[1]) for s in series)
    ax.plot(series[0][0][:n], np.mean([s[1][:n] for s in series], 0), marker="o", label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("top-10 overlap")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "overlap_vs_step.png"), dpi=100)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--quick", action="store_true", help="10 steps per stage, 64 eval examples")
  parser.add_argument("--out", default="experiments/results")
  parser.add_argument("--runs", default="runs/reproduce")
  parser.add_argument("--base_dir", default="runs/base_policy")
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  base = run(make_config("base", 0, os.path.join(args.runs, "base"), args))
  per_seed = [run_seed(seed, args) for seed in seeds]
  minutes = (time.perf_counter() - start) / 60
  command = "python experiments/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"command": command, "minutes": minutes, "seeds": seeds, "base": base,
               "runs": per_seed}, f, indent=1)
  base_acc = {k: v for k, v in base.items() if k.startswith("accuracy/")}
  text = [f"# Toy-suite reproduction\n\nMade by `{command}` in {minutes:.0f} minutes on "
          f"this 2-core CPU; seeds {seeds}; held-out accuracy (%) on "
          f"{base['eval_examples_per_capability']} examples per capability, mean ± std over "
          "seeds (the base is one shared policy). Bold: best column per row.\n",
          "## Three branches (text, image, video)\n", table(columns_three(base_acc, per_seed), CAPS),
          "\n## Two branches (text + image)\n", table(columns_two(base_acc, per_seed), ("text", "image")),
          "\n![accuracy](accuracy_vs_step.png)\n\n![overlap](overlap_vs_step.png)\n"]
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(text))
  plot(args, seeds)
  print("\n".join(text))
  print(json.dumps({"minutes": round(minutes, 1), "seeds": seeds}))


if __name__ == "__main__":
  main()
