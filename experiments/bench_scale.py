"""Cross-expert traffic of the compiled CoPD OPD step, and per-device memory of the 4B pod
config, from XLA's compiled executable on simulated CPU devices (nothing is allocated).

    python -m experiments.bench_scale [--quick] [--layers N]

Each compile runs in its own subprocess with XLA_FLAGS=--xla_force_host_platform_device_count
set before jax is imported. Figures:
  expert_axis_bytes_per_opd_step: bytes of every collective whose device groups span more
    than one `expert` coordinate, summed over the optimized HLO of the OPD update (loop trip
    counts included). HLO shapes are PER DEVICE, so this is what one device sends/receives
    across the expert axis in one step (max(operand, result) per collective: an upper bound;
    an all-to-all's own-slot share, which stays on the device, is counted too).
  expert_axis_bytes_leaving_device_per_opd_step / param_to_leaving_traffic_ratio: the same
    without each all-to-all's own slot ((g-1)/g of it leaves the device, g = group size).
  param_bytes_per_expert: f32 parameter bytes of one branch (the full model, all layers).
  param_to_expert_traffic_ratio (per device): (param_bytes_per_expert / devices per expert)
    / expert_axis_bytes_per_opd_step: what moving the parameters would cost a device vs
    what the step moves. Cross traffic does not depend on depth (only tokens, frames and
    log-probs cross), so a compile with fewer layers measures it exactly.
  whole_mesh_traffic_ratio: param_bytes_per_expert / (expert_axis_bytes_per_opd_step x all
    devices): one expert's parameters vs everything every device moves across experts.
  teacher_forward_rows: rows the teacher forwards score per step on the config's mesh:
    with an `expert` axis of several groups every teacher at the largest teacher's load
    (one SPMD call; parameters never cross `expert`), else each teacher its own rows
    (teacher_forward_rows_one_device); teacher_forward_rows_gather_layout = teachers x the
    largest teacher's rows, the padding of the earlier global-gather layout (the
    all-to-all layout before its compaction scored students x teachers x slot width C);
    cross_rows = the rows that need a score.
  per_device_memory_4b: compiled.memory_analysis() of the 4B OPD update on the pod mesh:
    arguments (params, Adam state, teacher view, rows) + outputs + temporaries (activations,
    gradients, XLA workspace), per device, at num_layers_compiled layers. With fewer than
    36 layers compiled, per_device_memory_4b_extrapolated_36_layers adds the measured
    per-layer slope (two depths) -- an EXTRAPOLATION, not a compile.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from copd_jax.config_lib import spec_of


def routing_rows(cfg, topology: str) -> dict:
  """Teacher-forward row counts of the all-to-all layout vs the earlier gather layout."""
  import numpy as np

  from copd_jax.rl import schedules, stages as stages_lib
  rl, s = cfg.rl, cfg.num_experts
  caps = tuple(rl.capabilities)
  stage = stages_lib.Stage(
      name="rows", steps=1, student_data=tuple((c,) for c in caps),
      teacher_data=tuple((c,) for c in caps), live_teachers=True,
      topology=schedules.topology_matrix(s, topology, hub=caps.index(rl.opd.hub)),
      branch_beta=np.full(s, rl.opd.beta, np.float32), schedule=schedules.OPDSchedule(kind="cycle"),
      native_prompts=rl.native_prompts, cross_prompts=rl.cross_prompts,
      samples_per_prompt=rl.samples_per_prompt)
  assignment = stages_lib.cross_teacher_assignment(stage)
  routing = stages_lib.teacher_routing(assignment, s, rl.samples_per_prompt)
  per_teacher = [int((assignment == j).sum()) * rl.samples_per_prompt for j in range(s)]
  return {"teacher_forward_rows": routing.teacher_forward_rows(
              equal_loads=cfg.mesh.expert != 1),
          "teacher_forward_rows_one_device": routing.teacher_forward_rows(),
          "teacher_forward_rows_gather_layout": s * max(per_teacher),
          "cross_rows": sum(per_teacher)}


def measure(setting: str, num_layers: int | None, topology: str | None) -> dict:
  """Runs inside the subprocess (jax already sees the simulated devices)."""
  from copd_jax import default_config, sharding
  from copd_jax.analysis import abstract_step, hlo_audit
  from copd_jax.models import decoder, model_config
  if setting == "toy":
    cfg = default_config.get("copd", "toy")
    cfg.mesh.update(dict(expert=3, data=2, fsdp=2, tensor=1))
  else:
    from configs import pod_4b
    cfg = pod_4b.get_config()
  topology = topology or cfg.rl.opd.topology
  run = sharding.RunSharding(
      sharding.make_mesh(dict(cfg.mesh), num_branches=cfg.num_experts),
      param_axes=decoder.param_axes(model_config.ModelConfig.from_dict(cfg.model.to_dict())))
  full_fn, full_args = abstract_step.abstract_opd_update(spec_of(cfg), run, topology=topology)
  param_bytes = abstract_step.tree_bytes(full_args[0]) // cfg.num_experts
  fn, args = (full_fn, full_args) if num_layers is None else abstract_step.abstract_opd_update(
      cfg, run, num_layers=num_layers, topology=topology)
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  found = hlo_audit.collectives_crossing_axis(compiled.as_text(), run.mesh)
  devices = int(run.mesh.devices.size)
  devices_per_expert = devices // run.mesh.shape["expert"]
  per_device_params = param_bytes / devices_per_expert
  traffic = max(found["total_bytes"], 1)
  return {
      "setting": setting, "topology": topology, "devices": devices,
      "mesh": dict(run.mesh.shape), "num_layers": int(cfg.model.num_layers),
      "num_layers_compiled": int(num_layers or cfg.model.num_layers),
      "rows_shape": list(args[3].tokens.shape),
      "micro_batch_rows": int(cfg.rl.get("micro_batch_rows", 0)),
      "remat": bool(cfg.model.get("remat", False)),
      "expert_axis_bytes_per_opd_step": int(found["total_bytes"]),
      "expert_axis_largest_collective_bytes": int(found["max_bytes"]),
      "expert_axis_collectives": int(found["count"]),
      "expert_axis_collective_kinds": sorted({c.kind for c in found["collectives"]}),
      "param_bytes_per_expert": int(param_bytes),
      "param_bytes_per_expert_per_device": int(per_device_params),
      "param_to_expert_traffic_ratio": per_device_params / traffic,
      "expert_axis_bytes_leaving_device_per_opd_step": int(found["total_bytes_leaving_device"]),
      "param_to_leaving_traffic_ratio": per_device_params / max(found["total_bytes_leaving_device"], 1),
      "whole_mesh_traffic_ratio": param_bytes / (traffic * devices),
      **routing_rows(cfg, topology),
      "memory": abstract_step.compiled_memory_bytes(compiled),
      "compile_s": round(compile_s, 1),
  }


def run_setting(setting: str, devices: int, num_layers: int | None, timeout: int,
                topology: str | None = None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "experiments.bench_scale", "--child", setting,
         "--layers", str(num_layers or 0), "--topology", topology or ""]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  if out.returncode:
    raise RuntimeError(f"{setting} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


TRAFFIC_KEYS = ("expert_axis_bytes_per_opd_step", "expert_axis_collective_kinds",
                "param_bytes_per_expert", "param_to_expert_traffic_ratio",
                "expert_axis_bytes_leaving_device_per_opd_step", "param_to_leaving_traffic_ratio",
                "whole_mesh_traffic_ratio", "teacher_forward_rows",
                "teacher_forward_rows_gather_layout", "cross_rows", "mesh", "rows_shape")


def report(r: dict) -> None:
  print(f"{r['setting']} ({r['topology']}): mesh {r['mesh']} on {r['devices']} devices, rows "
        f"{r['rows_shape']}, {r['num_layers_compiled']}/{r['num_layers']} layers compiled in "
        f"{r['compile_s']} s (micro_batch_rows {r['micro_batch_rows']}, remat {r['remat']})")
  print(f"  cross-expert bytes per device per OPD step {r['expert_axis_bytes_per_opd_step']:,} "
        f"({r['expert_axis_collectives']} collectives {r['expert_axis_collective_kinds']}, "
        f"largest {r['expert_axis_largest_collective_bytes']:,}); params per expert "
        f"{r['param_bytes_per_expert']:,} B ({r['param_bytes_per_expert_per_device']:,} per "
        f"device); ratio per device {r['param_to_expert_traffic_ratio']:.1f} "
        f"({r['param_to_leaving_traffic_ratio']:.1f} counting only bytes that leave the "
        f"device), whole mesh {r['whole_mesh_traffic_ratio']:.1f}")
  print(f"  teacher forward rows {r['teacher_forward_rows']} (gather layout "
        f"{r['teacher_forward_rows_gather_layout']}, rows needing a score {r['cross_rows']})")
  m = r["memory"]
  print(f"  per-device memory: args {m['argument_bytes']:,} out {m['output_bytes']:,} temp "
        f"{m['temp_bytes']:,} total {m['total_bytes']:,}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="4B with 1 and 2 layers compiled")
  ap.add_argument("--layers", type=int, default=None, help="4B layers to compile (default 36)")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--topology", default="", help=argparse.SUPPRESS)
  ap.add_argument("--timeout", type=int, default=3600)
  a = ap.parse_args()
  if a.child:
    print(json.dumps(measure(a.child, a.layers or None, a.topology or None)))
    return
  layers_4b = a.layers or (2 if a.quick else None)
  toy = run_setting("toy", 12, None, a.timeout)
  toy_full = run_setting("toy", 12, None, a.timeout, "full")
  pod = run_setting("4b", 192, layers_4b, a.timeout)
  pod_full = run_setting("4b", 192, 1, a.timeout, "full")  # traffic does not depend on depth
  results = [toy, toy_full, pod, pod_full]
  shallow = None
  if pod["num_layers_compiled"] < pod["num_layers"] and pod["num_layers_compiled"] > 1:
    shallow = run_setting("4b", 192, pod["num_layers_compiled"] - 1, a.timeout)
    results.append(shallow)
  for r in results:
    report(r)
  result = {
      "toy": {k: toy[k] for k in TRAFFIC_KEYS},
      "toy_full_mesh": {k: toy_full[k] for k in TRAFFIC_KEYS},
      "4b": {**{k: pod[k] for k in TRAFFIC_KEYS},
             **{k: pod[k] for k in ("num_layers", "num_layers_compiled", "compile_s",
                                    "micro_batch_rows", "remat")}},
      "4b_full_mesh": {k: pod_full[k] for k in TRAFFIC_KEYS},
      "per_device_memory_4b": pod["memory"],
      "per_device_memory_4b_note": "memory_analysis of the compiled OPD update at "
                                   "num_layers_compiled layers; args+out+temp per device",
      "traffic_ratio_target_4b": 1000,
      "hbm_bytes_per_chip_4b": 95 * 2**30,
      "bytes_are": "per device (HLO shard shapes); ratio = param bytes per device of one expert "
                   "/ cross-expert bytes per device; whole_mesh = one expert's param bytes / "
                   "cross-expert bytes summed over all devices",
  }
  if pod["num_layers_compiled"] == pod["num_layers"]:
    # A real compile of every layer, not an extrapolation.
    result["per_device_bytes_4b_36_layers"] = int(pod["memory"]["total_bytes"])
    result["fits_95e9"] = pod["memory"]["total_bytes"] <= 95e9
  if shallow is not None:
    layers, depth = pod["num_layers"], pod["num_layers_compiled"]
    per_layer = {k: pod["memory"][k] - shallow["memory"][k]
                 for k in ("argument_bytes", "temp_bytes", "total_bytes")}
    result["per_device_memory_4b_per_layer"] = per_layer
    result["per_device_memory_4b_extrapolated_36_layers"] = {
        k: pod["memory"][k] + (layers - depth) * v for k, v in per_layer.items()}
    result["per_device_memory_4b_extrapolation_note"] = (
        f"EXTRAPOLATION, not a compile: memory at {depth} layers + {layers - depth} x the "
        f"per-layer difference between {depth - 1} and {depth} compiled layers")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
