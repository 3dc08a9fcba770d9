"""Ablate CoPD on the toy suite: interleave schedule, hub, and beta.

    python experiments/ablate.py [--seeds 0] [--quick] [--only schedule,hub,beta]

Every variant is the `copd` config with overrides (nothing else changes), from the same
shared base; the merged model is evaluated. Writes <out>/ablation.md and ablation.json.
Schedules (S_RL : S_OPD): no OPD, 3:1, 1.5:1 (the paper's), 1:1, 1:2, and adaptive (an OPD
phase of 2 steps whenever the measured branch overlap falls below 0.99; overlap measured
every 2 steps).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402  (shares config building, running and table layout)

SCHEDULES = {
    "no OPD": dict(rl__opd__schedule__kind="none"),
    "3:1": dict(rl__opd__schedule__s_rl=3, rl__opd__schedule__s_opd=1),
    "1.5:1 (paper)": dict(rl__opd__schedule__s_rl=3, rl__opd__schedule__s_opd=2),
    "1:1": dict(rl__opd__schedule__s_rl=2, rl__opd__schedule__s_opd=2),
    "1:2": dict(rl__opd__schedule__s_rl=1, rl__opd__schedule__s_opd=2),
    "adaptive": dict(rl__opd__schedule__kind="adaptive", rl__opd__schedule__s_opd=2,
                     rl__opd__schedule__overlap_target=0.99, rl__diagnostics_every=2),
}
HUBS = {f"hub = {h}": dict(rl__opd__hub=h) for h in ("text", "image", "video")}
HUBS["full mesh"] = dict(rl__opd__topology="full")
BETAS = {f"beta = {b}": dict(rl__opd__beta=b) for b in (0.5, 2.0, 8.0)}  # 1.0: the schedule sweep
SWEEPS = {"schedule": SCHEDULES, "hub": HUBS, "beta": BETAS}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--only", default="schedule,hub,beta")
  parser.add_argument("--out", default="experiments/results")
  parser.add_argument("--runs", default="runs/ablate")
  parser.add_argument("--base_dir", default="runs/base_policy")
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  results = {}
  for sweep in args.only.split(","):
    for name, overrides in SWEEPS[sweep].items():
      slug = "".join(ch if ch.isalnum() else "_" for ch in name)
      results[(sweep, name)] = [
          reproduce.run(reproduce.make_config("copd", seed, f"{args.runs}/{sweep}/{slug}/seed{seed}",
                                              args, **overrides))
          for seed in seeds]
  minutes = (time.perf_counter() - start) / 60
  command = "python experiments/ablate.py " + " ".join(sys.argv[1:] if argv is None else argv)
  lines = [f"# CoPD ablations on the toy suite\n\nMade by `{command}` in {minutes:.0f} minutes; "
           f"seeds {seeds}; merged-model held-out accuracy (%), mean ± std over seeds.\n"]
  for sweep in args.only.split(","):
    cols = [(name, [r["final"] for r in results[(sweep, name)]]) for name in SWEEPS[sweep]]
    lines += [f"## {sweep}\n", reproduce.table(cols, reproduce.CAPS), ""]
  with open(os.path.join(args.out, "ablation.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(args.out, "ablation.json"), "w") as f:
    json.dump({"command": command, "minutes": minutes,
               "runs": {f"{s}/{n}": v for (s, n), v in results.items()}}, f, indent=1)
  print("\n".join(lines))
  print(json.dumps({"minutes": round(minutes, 1), "variants": len(results), "seeds": seeds}))


if __name__ == "__main__":
  main()
