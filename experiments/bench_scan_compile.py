"""Compile time of the decoder's training gradient, unrolled vs scanned layers (CPU).

With unrolled layers the compiled program holds one copy of the layer per layer, so XLA's
compile time grows with depth; with config.model.scan_layers the program holds one layer
body inside a loop, so compile time should stay about flat. This script lowers and compiles
(abstract inputs, nothing allocated) jax.grad of a next-token loss for each depth and
layout, with remat on (as the pod configs run), and prints

  compile_s[layout][layers]          seconds for lower + compile, best of --repeats
  depth_ratio[layout]                compile_s at the deepest / at the shallowest depth
  scanned_over_unrolled              scanned / unrolled compile_s at the deepest depth

The last line is JSON. Usage:
  python experiments/bench_scan_compile.py [--layers 2,8,16] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from copd_jax.models import decoder, model_config


def model(num_layers: int, scan: bool) -> model_config.ModelConfig:
  """A small Qwen3-layout decoder (no vision tower), bf16 compute, remat on."""
  return model_config.ModelConfig(
      vocab_size=1024, d_model=256, num_layers=num_layers, num_heads=8, num_kv_heads=4,
      head_dim=32, mlp_dim=768, tie_embeddings=False, dtype="bfloat16", remat=True,
      scan_layers=scan)


def loss(params, cfg, tokens, mask):
  hidden = decoder.forward_hidden(params, cfg, tokens, decoder.positions_from_mask(mask), mask)
  logits = decoder.logits_from_hidden(hidden[:, :-1], decoder.lm_head(params, cfg))
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def compile_seconds(cfg: model_config.ModelConfig, repeats: int, batch=4, length=128) -> float:
  params = jax.eval_shape(lambda k: decoder.init_params(cfg, k), jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
  best = float("inf")
  for _ in range(repeats):
    # A fresh function each time: no jit cache hit, the full lower + compile is timed.
    fn = jax.jit(lambda p, t, m: jax.grad(loss)(p, cfg, t, m))
    start = time.perf_counter()
    fn.lower(params, tokens, mask).compile()
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="2,8,16", help="comma-separated depths")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  depths = sorted(int(n) for n in args.layers.split(","))
  compile_s: dict[str, dict[int, float]] = {"unrolled": {}, "scanned": {}}
  for layers in depths:
    for layout, scan in (("unrolled", False), ("scanned", True)):
      compile_s[layout][layers] = round(compile_seconds(model(layers, scan), args.repeats), 3)
      print(f"{layout:9s} {layers:3d} layers: {compile_s[layout][layers]:7.2f} s", flush=True)
  lo, hi = depths[0], depths[-1]
  depth_ratio = {k: round(v[hi] / v[lo], 2) for k, v in compile_s.items()}
  scanned_over_unrolled = round(compile_s["scanned"][hi] / compile_s["unrolled"][hi], 3)
  print(f"compile time {hi} / {lo} layers: unrolled {depth_ratio['unrolled']}x, scanned "
        f"{depth_ratio['scanned']}x; scanned / unrolled at {hi} layers: "
        f"{scanned_over_unrolled}")
  print(json.dumps({
      "compile_s": {k: {str(n): s for n, s in v.items()} for k, v in compile_s.items()},
      "depth_ratio": depth_ratio, "scanned_over_unrolled": scanned_over_unrolled,
      "program": "jax.grad of next-token loss, remat, bf16, batch 4 x 128, d_model 256",
      "backend": jax.default_backend(), "cpu": platform.processor() or platform.machine(),
      "jax": jax.__version__}))


if __name__ == "__main__":
  main()
