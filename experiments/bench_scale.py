"""Cross-expert traffic of the compiled CoPD OPD step, and per-device memory of the 4B pod
config, from XLA's compiled executable on simulated CPU devices (nothing is allocated).

    python -m experiments.bench_scale [--quick] [--layers N]

Each setting runs in its own subprocess with XLA_FLAGS=--xla_force_host_platform_device_count
set before jax is imported. Figures:
  expert_axis_bytes_per_opd_step: bytes of every collective whose device groups span more
    than one `expert` coordinate, summed over the optimized HLO of the OPD update (loop trip
    counts included). HLO shapes are PER DEVICE, so this is what one device sends/receives
    across the expert axis in one step (max(operand, result) per collective: an upper bound).
  param_bytes_per_expert: f32 parameter bytes of one branch (the full model, all layers).
  param_to_expert_traffic_ratio: (param_bytes_per_expert / devices per expert) divided by
    expert_axis_bytes_per_opd_step, i.e. per device: what moving the parameters would cost
    vs what the step moves. Cross traffic does not depend on depth (only tokens, masks,
    frames and log-probs cross), so a compile with fewer layers measures it exactly.
  per_device_memory_4b: compiled.memory_analysis() of the 4B OPD update on the pod mesh:
    arguments (params, Adam state, teacher view, rows) + outputs + temporaries (activations,
    gradients, XLA workspace), per device, at num_layers_compiled layers.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(setting: str, num_layers: int | None) -> dict:
  """Runs inside the subprocess (jax already sees the simulated devices)."""
  import jax
  from copd_jax import default_config, parallel
  if setting == "toy":
    cfg = default_config.get("copd", "toy")
    cfg.mesh.update(dict(expert=3, data=2, fsdp=2, tensor=1))
  else:
    from configs import pod_4b
    cfg = pod_4b.get_config()
  run = parallel.RunSharding(parallel.make_mesh(dict(cfg.mesh), num_branches=cfg.num_experts))
  full_fn, full_args = parallel.abstract_opd_update(cfg, run)
  param_bytes = parallel.tree_bytes(full_args[0]) // cfg.num_experts
  fn, args = (full_fn, full_args) if num_layers is None else parallel.abstract_opd_update(
      cfg, run, num_layers=num_layers)
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  found = parallel.collectives_crossing_axis(compiled.as_text(), run.mesh)
  devices_per_expert = run.mesh.devices.size // run.mesh.shape["expert"]
  per_device_params = param_bytes / devices_per_expert
  rows = args[3]
  return {
      "setting": setting, "devices": int(run.mesh.devices.size), "mesh": dict(run.mesh.shape),
      "num_layers": int(cfg.model.num_layers),
      "num_layers_compiled": int(num_layers or cfg.model.num_layers),
      "rows_shape": list(rows.tokens.shape),
      "expert_axis_bytes_per_opd_step": int(found["total_bytes"]),
      "expert_axis_largest_collective_bytes": int(found["max_bytes"]),
      "expert_axis_collectives": int(found["count"]),
      "param_bytes_per_expert": int(param_bytes),
      "param_bytes_per_expert_per_device": int(per_device_params),
      "param_to_expert_traffic_ratio": per_device_params / max(found["total_bytes"], 1),
      "memory": parallel.compiled_memory_bytes(compiled),
      "compile_s": round(compile_s, 1),
  }


def run_setting(setting: str, devices: int, num_layers: int | None, timeout: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "experiments.bench_scale", "--child", setting,
         "--layers", str(num_layers or 0)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  if out.returncode:
    raise RuntimeError(f"{setting} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="4B with 2 layers compiled")
  ap.add_argument("--layers", type=int, default=None, help="4B layers to compile (default 36)")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--timeout", type=int, default=3600)
  a = ap.parse_args()
  if a.child:
    print(json.dumps(measure(a.child, a.layers or None)))
    return
  layers_4b = a.layers or (2 if a.quick else None)
  toy = run_setting("toy", 12, None, a.timeout)
  pod = run_setting("4b", 192, layers_4b, a.timeout)
  for r in (toy, pod):
    print(f"{r['setting']}: mesh {r['mesh']} on {r['devices']} devices, rows {r['rows_shape']}, "
          f"{r['num_layers_compiled']}/{r['num_layers']} layers compiled in {r['compile_s']} s")
    print(f"  cross-expert bytes per device per OPD step {r['expert_axis_bytes_per_opd_step']:,} "
          f"({r['expert_axis_collectives']} collectives, largest "
          f"{r['expert_axis_largest_collective_bytes']:,}); params per expert "
          f"{r['param_bytes_per_expert']:,} B ({r['param_bytes_per_expert_per_device']:,} per "
          f"device); ratio {r['param_to_expert_traffic_ratio']:.1f}")
    m = r["memory"]
    print(f"  per-device memory: args {m['argument_bytes']:,} out {m['output_bytes']:,} temp "
          f"{m['temp_bytes']:,} total {m['total_bytes']:,}")
  result = {
      "toy": {k: toy[k] for k in ("expert_axis_bytes_per_opd_step", "param_bytes_per_expert",
                                   "param_to_expert_traffic_ratio", "mesh", "rows_shape")},
      "4b": {k: pod[k] for k in ("expert_axis_bytes_per_opd_step", "param_bytes_per_expert",
                                  "param_to_expert_traffic_ratio", "mesh", "rows_shape",
                                  "num_layers", "num_layers_compiled", "compile_s")},
      "per_device_memory_4b": pod["memory"],
      "per_device_memory_4b_note": "memory_analysis of the compiled OPD update at "
                                   "num_layers_compiled layers; args+out+temp per device",
      "traffic_ratio_target_4b": 1000,
      "bytes_are": "per device (HLO shard shapes); ratio = param bytes per device of one expert "
                   "/ cross-expert bytes per device",
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
