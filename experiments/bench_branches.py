"""How a CoPD OPD step's cost grows with the number of branches N, hub and full mesh.

    python experiments/bench_branches.py [--quick]

Toy shape (measured): the toy suite's decoder (f32), N branches with the same rows per
branch (native and cross prompts x G = 8 samples, prompt 64 + response 24 tokens, random
tokens), N = 2, 3, 4, 6, 8; for each N and topology, one OPD update (teacher scoring +
optimizer step of every branch, update_lib.update) is timed (median of repeats after a
compile) and its per-process memory read from XLA's compiled memory analysis.
4B shape (from abstract compiles, nothing allocated; skipped with --quick): configs/pod_4b.py
with N branches on N x 64 simulated devices (expert = N, fsdp 16, tensor 4), 1 decoder
layer compiled (cross-expert traffic does not depend on depth): cross-expert bytes per
device per OPD step and per-device memory.

LoRA memory (always, from jax.eval_shape): `lora_memory_ratio_n12` = bytes of 12 full
branches over bytes of one base + 12 rank-16 adapters, params plus AdamW state, for the
4B shape (lora_memory_4b); `lora_adapter_bytes_per_branch` = one branch's f32 adapters.

Growth: for each topology a least-squares fit of step time to a + b N + c N^2 and the
exponent k of a power law t ~ N^k; `growth` names the order (linear when the quadratic
term adds less than 10% at N = 8). The full mesh is called unaffordable from the first N
at which its step costs more than 1.5x the hub's (the crossover; extrapolated from the fits
when the measured range does not reach it). Writes experiments/results/branches.png.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from copd_jax.config_lib import spec_of

TOPOLOGIES = ("hub", "full")
AFFORDABLE_RATIO = 1.5


def toy_problem(n: int, topology: str, native: int, cross: int, g: int = 8, p: int = 64,
                r: int = 24, seed: int = 0):
  """(params, opt_state, rows, routing, ucfg, optimizer, cross_row_start) for N branches."""
  import jax
  import jax.numpy as jnp

  from copd_jax import default_config, kernels
  from copd_jax.models import model_config as model_lib, stacked as experts
  from copd_jax import losses
  from copd_jax.rl import rows as rows_lib, schedules, stages, update as update_lib
  cfg = default_config.get("copd")
  model_cfg = model_lib.ModelConfig.from_dict(dict(cfg.model.to_dict(), dtype="float32"))
  caps = ("text", "image", "video")
  stage = stages.Stage(
      name="bench", steps=1, student_data=tuple((caps[i % 3],) for i in range(n)),
      teacher_data=tuple((caps[i % 3],) for i in range(n)), live_teachers=True,
      topology=schedules.topology_matrix(n, topology, hub=0),
      branch_beta=np.ones(n, np.float32), schedule=schedules.OPDSchedule(kind="cycle"),
      native_prompts=native, cross_prompts=cross, samples_per_prompt=g)
  assignment = stages.cross_teacher_assignment(stage)
  routing = stages.teacher_routing(assignment, n, g, native_rows=native * g)
  rng = np.random.default_rng(seed)
  rows_per = (native + cross) * g
  t = p + r
  tokens = rng.integers(4, model_cfg.vocab_size, (n, rows_per, t)).astype(np.int32)
  tokens[:, :, :p] = np.repeat(tokens[:, ::g, :p], g, axis=1)  # G samples share a prompt
  response = np.zeros((n, rows_per, t), np.float32)
  response[..., p - 1:-1] = 1
  v = model_cfg.vision
  frames = rng.normal(size=(n, rows_per // g, v.num_frames, v.image_size, v.image_size,
                            v.channels)).astype(np.float32)
  rows = rows_lib.Rows(
      tokens=jnp.asarray(tokens),
      positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, rows_per, t)),
      token_mask=jnp.ones((n, rows_per, t), bool), response_mask=jnp.asarray(response),
      old_logprobs=jnp.full((n, rows_per, t), -3.0), advantages=jnp.asarray(
          rng.normal(size=(n, rows_per)), jnp.float32),
      opd_beta=jnp.asarray(np.where(np.arange(rows_per) >= native * g, 1.0, 0.0)[None]
                           .repeat(n, 0), jnp.float32),
      frames=jnp.asarray(np.repeat(frames, g, axis=1)))
  ucfg = rows_lib.UpdateConfig(model=model_cfg, loss=losses.PolicyLossConfig(),
                              kernel=kernels.KernelConfig(**cfg.rl.kernel.to_dict()),
                              samples_per_prompt=g)
  optimizer = update_lib.make_optimizer(3e-4, 1.0)
  params = experts.init_stacked(model_cfg, jax.random.split(jax.random.key(seed), n))
  opt_state = update_lib.init_optimizer_state(optimizer, params)
  params, opt_state = jax.device_put((params, opt_state), jax.devices()[0])
  return params, opt_state, rows, routing, ucfg, optimizer, native * g, p


def measure_toy(n: int, topology: str, native: int, cross: int, repeats: int) -> dict:
  import dataclasses

  import jax

  from copd_jax.analysis import abstract_step
  from copd_jax.rl import scoring, update as update_lib
  params, opt_state, rows, routing, ucfg, optimizer, start, p = toy_problem(
      n, topology, native, cross)
  rows = dataclasses.replace(rows, prompt_len=p)
  teachers = scoring.Teachers(params, routing.as_arrays(), start)
  state = update_lib.TrainState(params, opt_state)
  from copd_jax import policy_setup, sharding
  run = sharding.RunSharding.one_device(policy_setup.declared_param_axes(ucfg.model))
  fn = update_lib.UpdateFn(run, ucfg, optimizer)
  compiled = update_lib.update_program(fn).lower(state, rows, teachers, None).compile()
  memory = abstract_step.compiled_memory_bytes(compiled)
  jax.block_until_ready(update_lib.update(fn, state, rows, teachers))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(update_lib.update(fn, state, rows, teachers))
    times.append(time.perf_counter() - t0)
  return {"n": n, "topology": topology, "step_s": float(np.median(times)),
          "peak_bytes": int(memory["total_bytes"]), "temp_bytes": int(memory["temp_bytes"]),
          "teacher_forward_rows": routing.teacher_forward_rows(),
          "cross_rows": int(routing.send_valid.sum()), "rows_per_branch": int(rows.tokens.shape[1])}


def measure_4b_child(n: int, topology: str) -> dict:
  """Inside a subprocess whose jax sees n x 64 simulated devices."""
  from configs import pod_4b
  from copd_jax import sharding
  from copd_jax.analysis import abstract_step, hlo_audit
  from copd_jax.models import decoder, model_config
  cfg = pod_4b.get_config()
  caps = ("text", "image", "video")
  cfg.rl.capabilities = tuple(caps[i % 3] + ("" if i < 3 else str(i)) for i in range(n))
  cfg.rl.opd.hub = cfg.rl.capabilities[0]
  cfg.num_experts = n
  cfg.mesh.expert = n
  run = sharding.RunSharding(
      sharding.make_mesh(dict(cfg.mesh), num_branches=n),
      param_axes=decoder.param_axes(model_config.ModelConfig.from_dict(cfg.model.to_dict())))
  fn, args = abstract_step.abstract_opd_update(spec_of(cfg), run, num_layers=1, topology=topology)
  compiled = fn.lower(*args).compile()
  found = hlo_audit.collectives_crossing_axis(compiled.as_text(), run.mesh)
  memory = abstract_step.compiled_memory_bytes(compiled)
  return {"n": n, "topology": topology, "expert_axis_bytes_per_device": int(found["total_bytes"]),
          "peak_bytes_per_device_1_layer": int(memory["total_bytes"])}


def measure_4b(n: int, topology: str, timeout: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={64 * n}")
  cmd = [sys.executable, "-m", "experiments.bench_branches", "--child", f"{n}:{topology}"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if out.returncode:
    raise RuntimeError(f"4B N={n} {topology} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ fitting

def fit_growth(ns, times) -> dict:
  """Least squares t = a + b N + c N^2, and the power-law exponent of t over N."""
  ns, times = np.asarray(ns, float), np.asarray(times, float)
  a, b, c = np.linalg.lstsq(np.stack([np.ones_like(ns), ns, ns ** 2], 1), times, rcond=None)[0]
  exponent = float(np.polyfit(np.log(ns), np.log(times), 1)[0])
  quadratic_share_at_8 = abs(c) * 64 / max(abs(a + 8 * b + 64 * c), 1e-12)
  return {"a": float(a), "b": float(b), "c": float(c), "exponent": round(exponent, 3),
          "quadratic_share_at_n8": round(float(quadratic_share_at_8), 3),
          "order": "quadratic" if quadratic_share_at_8 >= 0.1 and c > 0 else "linear"}


def crossover(fits: dict, measured: dict) -> dict:
  """First N where the full mesh's step costs > AFFORDABLE_RATIO x the hub's."""
  for n in sorted(measured["full"]):
    if measured["full"][n] > AFFORDABLE_RATIO * measured["hub"][n]:
      return {"n": n, "source": "measured"}
  predict = lambda f, n: f["a"] + f["b"] * n + f["c"] * n * n  # noqa: E731
  for n in range(2, 257):
    if predict(fits["full"], n) > AFFORDABLE_RATIO * predict(fits["hub"], n):
      return {"n": n, "source": "extrapolated from the fits"}
  return {"n": None, "source": "no crossover up to N = 256 by the fits"}


def plot(toy: list, fits: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  grid = np.linspace(2, 8, 50)
  for topology, style in zip(TOPOLOGIES, ("o-", "s--")):
    pts = [(r["n"], r["step_s"]) for r in toy if r["topology"] == topology]
    ax.plot(*zip(*pts), style, label=f"{topology} (measured)")
    f = fits[topology]
    ax.plot(grid, f["a"] + f["b"] * grid + f["c"] * grid ** 2, ":", color="grey")
  ax.set_xlabel("branches N")
  ax.set_ylabel("OPD update step (s)")
  ax.set_title("CoPD OPD step vs branches (toy shape, CPU)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def lora_memory_4b(num_branches: int = 12, rank: int = 16) -> dict:
  """Bytes of N full branches over bytes of one base + N rank-r LoRA adapters, params
  plus optimizer state, for configs/pod_4b.py's model (Qwen3-VL-4B, the vision tower
  included) -- from jax.eval_shape, nothing allocated.

  The optimizer is the training one (update_lib.make_optimizer: global-norm clipping +
  AdamW): its state is adam's two f32 moments (mu, nu) per trained entry plus a step
  count per branch. Full fine-tuning trains every parameter of every branch; LoRA trains
  the adapters (all seven projections of every decoder layer), and the frozen base has
  no optimizer state."""
  import jax

  from configs import pod_4b
  from copd_jax import config_lib, policy_setup
  from copd_jax.analysis import tpu_compile
  from copd_jax.models import lora, stacked as stacked_lib
  from copd_jax.rl import update as update_lib
  cfg = config_lib.spec_of(pod_4b.get_config())
  model_cfg = tpu_compile.run_model_config(cfg)
  spec = lora.LoraSpec(rank=rank, alpha=2.0 * rank)
  optimizer = update_lib.make_optimizer(1e-6, 1.0)

  def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))

  key = jax.random.key(0)
  base = jax.eval_shape(lambda k: policy_setup.init_policy_params(model_cfg, k), key)
  full = jax.eval_shape(lambda p: stacked_lib.broadcast_params(p, num_branches), base)
  full_state = jax.eval_shape(lambda p: update_lib.init_optimizer_state(optimizer, p), full)
  branches = jax.eval_shape(
      lambda p, k: stacked_lib.initial_branches(p, num_branches, spec, k), base, key)
  lora_state = jax.eval_shape(lambda p: update_lib.init_optimizer_state(optimizer, p),
                              branches)
  full_bytes = nbytes(full) + nbytes(full_state)
  lora_bytes = nbytes(branches) + nbytes(lora_state)  # the base once, no state for it
  per_branch = nbytes(branches.adapters) // num_branches
  return {"num_branches": num_branches, "rank": rank, "optimizer": "adamw (mu, nu f32)",
          "base_param_bytes": nbytes(base), "full_branches_bytes": full_bytes,
          "lora_branches_bytes": lora_bytes,
          "adapter_param_bytes_per_branch": per_branch,
          "adapter_bytes_per_branch_with_adam": per_branch * 3,
          "lora_memory_ratio": round(full_bytes / lora_bytes, 2)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer rows and repeats, no 4B compiles")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default="experiments/results/branches.png")
  parser.add_argument("--timeout", type=int, default=1800)
  args = parser.parse_args(argv)
  if args.child:
    n, topology = args.child.split(":")
    print(json.dumps(measure_4b_child(int(n), topology)))
    return None
  lora_mem = lora_memory_4b(12, 16)
  print(f"[4B LoRA] 12 full branches {lora_mem['full_branches_bytes'] / 2**30:.1f} GiB vs base + "
        f"12 rank-16 adapters {lora_mem['lora_branches_bytes'] / 2**30:.1f} GiB (params + adam "
        f"state): {lora_mem['lora_memory_ratio']:.1f}x; per-branch adapter "
        f"{lora_mem['adapter_param_bytes_per_branch'] / 2**20:.1f} MiB params, "
        f"{lora_mem['adapter_bytes_per_branch_with_adam'] / 2**20:.1f} MiB with adam",
        flush=True)
  native, cross, repeats = (4, 4, 3) if args.quick else (8, 8, 5)
  ns = (2, 3, 4, 6, 8)
  toy = []
  for n in ns:
    for topology in TOPOLOGIES:
      r = measure_toy(n, topology, native, cross, repeats)
      toy.append(r)
      print(f"[toy] N={n} {topology}: OPD update {r['step_s']:.2f} s, peak "
            f"{r['peak_bytes'] / 2**20:.0f} MiB, teacher forward rows "
            f"{r['teacher_forward_rows']} for {r['cross_rows']} cross rows", flush=True)
  measured = {t: {r["n"]: r["step_s"] for r in toy if r["topology"] == t} for t in TOPOLOGIES}
  fits = {t: fit_growth(ns, [measured[t][n] for n in ns]) for t in TOPOLOGIES}
  memory_fits = {t: fit_growth(ns, [r["peak_bytes"] for r in toy if r["topology"] == t])
                 for t in TOPOLOGIES}
  pod = []
  if not args.quick:
    for n in ns:
      for topology in TOPOLOGIES:
        r = measure_4b(n, topology, args.timeout)
        pod.append(r)
        print(f"[4B] N={n} {topology}: cross-expert bytes per device "
              f"{r['expert_axis_bytes_per_device']:,}, peak per device (1 layer) "
              f"{r['peak_bytes_per_device_1_layer'] / 2**30:.1f} GiB", flush=True)
  try:
    plot(toy, fits, args.out)
  except ImportError:
    print("matplotlib not installed (pip install -e '.[plots]'): no plot", flush=True)
  out = {"bench": "branches", "quick": args.quick, "ns": list(ns),
         "rows_per_branch": toy[0]["rows_per_branch"],
         "toy": toy, "growth": {t: fits[t]["order"] for t in TOPOLOGIES},
         "fits": fits, "memory_growth": {t: memory_fits[t]["order"] for t in TOPOLOGIES},
         "full_over_hub": {n: round(measured["full"][n] / measured["hub"][n], 3) for n in ns},
         "full_mesh_unaffordable_from": crossover(fits, measured),
         "affordable_ratio": AFFORDABLE_RATIO, "pod_4b": pod,
         "lora_memory_ratio_n12": lora_mem["lora_memory_ratio"],
         "lora_adapter_bytes_per_branch": lora_mem["adapter_param_bytes_per_branch"],
         "lora_memory_4b": lora_mem}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
