"""Benchmark: fused policy loss, chunked backend against the dense reference.

Figures (all ratios measured side by side in this one process):
  peak_mem_ratio_qwen  temporary memory of loss forward+backward, reference / chunked,
                       at N=8192 tokens, hidden 2560, vocabulary 151,936 (Qwen3-VL-4B),
                       read from the compiled executables' memory analysis (abstract
                       shapes, nothing allocated).
  time_ratio           chunked / reference wall time of jit(value_and_grad(loss)), bf16
                       hidden states (the training setting), N=2048, D=1024, V=32768.
  time_ratio_f32       the same with f32 hidden states.
  *_fraction_of_dot_peak  useful FLOPs per second (6 N D V: one forward and two gradient
                       matmuls) over the best FLOP rate of a plain jnp.dot timed here, bf16
                       inputs with f32 accumulation, taking the better of the whole
                       [N, D] x [D, V] product and one [N, D] x [D, vocab_tile] tile.

Usage: python experiments/bench_loss.py [--quick]. The last line printed is one JSON object.
The pallas backend is not timed: on CPU it only runs in interpret mode (an emulator).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from copd_jax.kernels import KernelConfig, fused_policy_loss
from copd_jax.losses import PolicyLossConfig

QWEN = dict(n=8192, d=2560, v=151_936)
TIME_FULL = dict(n=2048, d=1024, v=32_768)
TIME_QUICK = dict(n=512, d=256, v=8192)
LOSS_CONFIG = PolicyLossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.01, kl_estimator="k3")


def loss_step(kernel: KernelConfig):
  """jit(value_and_grad) of the token-mean policy loss w.r.t. hidden and head."""

  def loss(hidden, head, tokens, advantages, old_logprobs, ref_logprobs, mask):
    total, denom, _ = fused_policy_loss(hidden, head, tokens, advantages, old_logprobs, mask,
                                        ref_logprobs=ref_logprobs, config=LOSS_CONFIG,
                                        kernel=kernel)
    return total / jnp.maximum(denom, 1.0)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def abstract_args(n, d, v, hidden_dtype):
  f32 = jnp.float32
  return (jax.ShapeDtypeStruct((n, d), hidden_dtype), jax.ShapeDtypeStruct((d, v), f32),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), f32),
          jax.ShapeDtypeStruct((n,), f32), jax.ShapeDtypeStruct((n,), f32),
          jax.ShapeDtypeStruct((n,), jnp.bool_))


def concrete_args(n, d, v, hidden_dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  return (jax.random.normal(keys[0], (n, d)).astype(hidden_dtype),
          jax.random.normal(keys[1], (d, v)) / jnp.sqrt(d),
          jax.random.randint(keys[2], (n,), 0, v),
          jax.random.normal(keys[3], (n,)),
          -2.0 - jax.random.uniform(keys[4], (n,)),
          -2.0 - jax.random.uniform(keys[5], (n,)),
          jnp.arange(n) % 7 != 0)


def temp_bytes(kernel, shape, hidden_dtype):
  compiled = loss_step(kernel).lower(*abstract_args(**shape, hidden_dtype=hidden_dtype)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def interleaved_times(fns, args, repeats):
  """Median wall time of each fn, alternating calls so machine noise hits all alike."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="smaller timing shape, fewer repeats")
  parser.add_argument("--vocab_tile", type=int, default=2048)
  parser.add_argument("--token_tile", type=int, default=2048)
  args = parser.parse_args()
  reference = KernelConfig("reference")
  chunked = KernelConfig("chunked", token_tile=args.token_tile, vocab_tile=args.vocab_tile)
  result = {"quick": args.quick, "token_tile": args.token_tile, "vocab_tile": args.vocab_tile,
            "device": jax.devices()[0].device_kind}

  # ---- memory at the Qwen3-VL-4B shape (compile only)
  for dtype_name, dtype in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
    ref_bytes = temp_bytes(reference, QWEN, dtype)
    chunked_bytes = temp_bytes(chunked, QWEN, dtype)
    suffix = "" if dtype_name == "bf16" else "_f32"
    result[f"ref_temp_bytes_qwen{suffix}"] = ref_bytes
    result[f"chunked_temp_bytes_qwen{suffix}"] = chunked_bytes
    result[f"peak_mem_ratio_qwen{suffix}"] = round(ref_bytes / chunked_bytes, 2)
    print(f"memory {dtype_name} hidden, N={QWEN['n']} D={QWEN['d']} V={QWEN['v']}: "
          f"reference {ref_bytes / 2**30:.2f} GiB, chunked {chunked_bytes / 2**20:.1f} MiB, "
          f"ratio {ref_bytes / chunked_bytes:.1f}")

# ---- wall time
  shape = TIME_QUICK if args.quick else TIME_FULL
  repeats = 3 if args.quick else 5
  n, d, v = shape["n"], shape["d"], shape["v"]
  useful_flops = 6 * n * d * v                    # forward + d_hidden + d_head matmuls
  result.update(time_shape=shape, flops_per_call=useful_flops,
                executed_flops_chunked=8 * n * d * v)  # + one recomputed forward per tile
  for dtype_name, dtype in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
    inputs = concrete_args(n, d, v, dtype)
    fns = {"reference": loss_step(reference), "chunked": loss_step(chunked)}
    if dtype_name == "bf16":
      hidden_bf16, head_bf16 = inputs[0], inputs[1].astype(jnp.bfloat16)
      head_tile = head_bf16[:, :args.vocab_tile]
      dot = jax.jit(lambda h, w: jnp.dot(h, w, preferred_element_type=jnp.float32))
      fns["dot_full"] = lambda *a: dot(hidden_bf16, head_bf16)
      fns["dot_tile"] = lambda *a: dot(hidden_bf16, head_tile)
    times = interleaved_times(fns, inputs, repeats)
    ratio = times["chunked"] / times["reference"]
    suffix = "" if dtype_name == "bf16" else "_f32"
    result[f"time_ratio{suffix}"] = round(ratio, 3)
    result[f"reference_time_s{suffix}"] = round(times["reference"], 4)
    result[f"chunked_time_s{suffix}"] = round(times["chunked"], 4)
    print(f"time {dtype_name} hidden, N={n} D={d} V={v}: reference {times['reference']:.3f} s, "
          f"chunked {times['chunked']:.3f} s, ratio {ratio:.3f}")
    if dtype_name == "bf16":
      dot_full = 2 * n * d * v / times["dot_full"]
      dot_tile = 2 * n * d * head_tile.shape[1] / times["dot_tile"]
      dot_peak = max(dot_full, dot_tile)
      result.update(dot_full_flops_per_s=round(dot_full),
                    dot_tile_flops_per_s=round(dot_tile),
                    dot_peak_flops_per_s=round(dot_peak))
      for name in ("reference", "chunked"):
        achieved = useful_flops / times[name]
        result[f"{name}_flops_per_s"] = round(achieved)
        result[f"{name}_fraction_of_dot_peak"] = round(achieved / dot_peak, 3)
      print(f"jnp.dot bf16->f32 peak {dot_peak / 1e9:.0f} GFLOP/s; useful FLOP/s: reference "
            f"{result['reference_flops_per_s'] / 1e9:.0f} G "
            f"({result['reference_fraction_of_dot_peak']:.2f} of peak), chunked "
            f"{result['chunked_flops_per_s'] / 1e9:.0f} G "
            f"({result['chunked_fraction_of_dot_peak']:.2f} of peak)")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
