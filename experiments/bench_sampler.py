"""Sampler benchmark: KV cache, shared prompt prefix, vmapped experts, achieved FLOP/s.

    python experiments/bench_sampler.py [--quick] [--dtype float32|bfloat16]

Every figure is a ratio of two variants timed side by side in this process (interleaved
repeats, median), because the machine is shared and noisy. Prints readable lines, then ONE
JSON object as the last line:
  kv_cache_speedup      tokens/s of `generate` (KV cache) over `generate_by_recompute`
                        (full forward every step), 64 new tokens
  prefix_share_speedup  G=8 samples per prompt sharing the prompt (one prefill per prompt,
                        the prefix's keys read once per prompt while decoding) over the
                        prompts repeated G times (one prefill and prefix per sample); also
                        with vision prompts
  prefill_share         fraction of a shared-prefix rollout spent in prefill
  stacked_vs_loop       E=3 experts: one stacked_generate call over a loop of 3 generate calls
  sampler_tokens_per_s, model_flops_per_token, achieved_flops_per_s, matmul_peak_flops_per_s,
  achieved_over_peak    throughput of the shared-prefix rollout against a jnp.dot peak
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from copd_jax import sampling
from copd_jax.models import decoder as model_lib, model_config, stacked as experts


def toy_config(dtype: str) -> model_config.ModelConfig:
  return model_config.ModelConfig(vocab_size=64, d_model=128, num_layers=4, num_heads=4,
                               num_kv_heads=2, head_dim=32, mlp_dim=384, dtype=dtype,
                               vision=model_config.VisionConfig(), image_token_id=3)


def make_prompts(key, batch: int, length: int, cfg, with_vision: bool):
  """Left-padded prompts of varied length (half to full); vision prompts start with the
  num_tokens placeholders. Returns (tokens int32[B, P], mask bool[B, P], clip | None)."""
  k_len, k_tok, k_img = jax.random.split(key, 3)
  lengths = jax.random.randint(k_len, (batch,), length // 2, length + 1)
  tokens = jax.random.randint(k_tok, (batch, length), 4, cfg.vocab_size)
  mask = jnp.arange(length)[None, :] >= (length - lengths)[:, None]
  clip = None
  if with_vision:
    v = cfg.vision
    lengths = jnp.maximum(lengths, v.num_tokens + 4)
    mask = jnp.arange(length)[None, :] >= (length - lengths)[:, None]
    first = length - lengths  # the first real column of each row
    cols = jnp.arange(length)[None, :]
    is_image = (cols >= first[:, None]) & (cols < first[:, None] + v.num_tokens)
    tokens = jnp.where(is_image, cfg.image_token_id, tokens)
    clip = jax.random.uniform(k_img, (batch, v.num_frames, v.image_size, v.image_size,
                                      v.channels))
  return jnp.where(mask, tokens, 0), mask, clip


def time_side_by_side(fns: dict, repeats: int) -> dict:
  """Median seconds per call of each zero-argument fn, runs interleaved (after a warm-up)."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak_flops(dtype: str, size: int, repeats: int) -> float:
  """FLOP/s of a square jnp.dot with f32 accumulation in the compute dtype."""
  a = jax.random.normal(jax.random.key(0), (size, size)).astype(dtype)
  dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  t = time_side_by_side({"dot": lambda: dot(a, a)}, repeats)["dot"]
  return 2 * size ** 3 / t


def decode_flops_per_token(cfg, context: float) -> float:
  """Matmul FLOPs to produce one token at a given attended context length (2 per MAC)."""
  d, hd = cfg.d_model, cfg.head_dim
  projections = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d
  per_layer = projections + 3 * d * cfg.mlp_dim + 2 * cfg.num_heads * hd * context
  return 2.0 * (cfg.num_layers * per_layer + d * cfg.vocab_size)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats, fewer prompts")
  parser.add_argument("--dtype", default="float32", choices=model_config.COMPUTE_DTYPES,
                      help="compute dtype; on a 2-core CPU the small decode matmuls run "
                      "faster in float32 (bf16 pays for conversions)")
  args = parser.parse_args()
  repeats = 3 if args.quick else 7
  batch = 4 if args.quick else 8  # prompts per expert
  prompt_len, new_tokens, group = 64, 64, 8

  cfg = toy_config(args.dtype)
  params = model_lib.init_params(cfg, jax.random.key(0))
  print(f"toy model: {model_lib.count_params(params):,} params, dtype {args.dtype}, "
        f"prompt {prompt_len}, new tokens {new_tokens}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s)")
  sample = sampling.SamplingConfig(max_new_tokens=new_tokens)  # no stop tokens: full length
  prefill_only = sampling.SamplingConfig(max_new_tokens=1)
  key = jax.random.key(1)
  results = {"dtype": args.dtype, "quick": args.quick}

  # 1. KV cache vs full recompute (one sample per prompt).
  tokens, mask, _ = make_prompts(jax.random.key(2), batch, prompt_len, cfg, False)
  one = sampling.Sampler(cfg, sample, 1)
  text = sampling.Prompts(tokens, mask)
  t = time_side_by_side({
      "cache": lambda: sampling.generate(params, one, text, key),
      "recompute": lambda: sampling.generate_by_recompute(params, one, text, key),
  }, repeats)
  results["kv_cache_speedup"] = t["recompute"] / t["cache"]
  print(f"[kv cache] {batch} prompts x {new_tokens} tokens: cache {t['cache'] * 1e3:.0f} ms, "
        f"full recompute {t['recompute'] * 1e3:.0f} ms -> {results['kv_cache_speedup']:.1f}x")

  # 2. Shared prompt prefix vs one prefill per sample, text and vision prompts.
  for with_vision in (False, True):
    name = "vision" if with_vision else "text"
    tokens, mask, clip = make_prompts(jax.random.key(3), batch, prompt_len, cfg, with_vision)
    rep = lambda x: None if x is None else jnp.repeat(x, group, axis=0)  # noqa: E731
    shared = sampling.Prompts(tokens, mask, clip)
    repeated = sampling.Prompts(rep(tokens), rep(mask), rep(clip))
    t = time_side_by_side({
        "shared": lambda: sampling.generate(
            params, sampling.Sampler(cfg, sample, group), shared, key),
        "per_sample": lambda: sampling.generate(
            params, sampling.Sampler(cfg, sample, 1), repeated, key),
        "shared_prefill": lambda: sampling.generate(
            params, sampling.Sampler(cfg, prefill_only, group), shared, key),
        "per_sample_prefill": lambda: sampling.generate(
            params, sampling.Sampler(cfg, prefill_only, 1), repeated, key),
    }, repeats)
    suffix = "" if name == "text" else "_vision"
    results["prefix_share_speedup" + suffix] = t["per_sample"] / t["shared"]
    results["prefill_share" + suffix] = t["shared_prefill"] / t["shared"]
    results["prefill_share_per_sample" + suffix] = t["per_sample_prefill"] / t["per_sample"]
    print(f"[prefix share, {name}] {batch} prompts x G={group}: shared {t['shared'] * 1e3:.0f} ms "
          f"(prefill {results['prefill_share' + suffix]:.0%}), per-sample prefill "
          f"{t['per_sample'] * 1e3:.0f} ms (prefill "
          f"{results['prefill_share_per_sample' + suffix]:.0%}) -> "
          f"{results['prefix_share_speedup' + suffix]:.2f}x")
    if name == "text":
      shared_seconds = t["shared"]

  # 3. E=3 experts: one vmapped call vs a Python loop of per-expert calls.
  num_experts = 3
  stacked = experts.init_stacked(cfg, jax.random.split(jax.random.key(4), num_experts))
  singles = [experts.take_expert(stacked, k) for k in range(num_experts)]
  per_expert = [make_prompts(jax.random.key(10 + k), batch, prompt_len, cfg, False)
                for k in range(num_experts)]
  e_tokens = jnp.stack([p[0] for p in per_expert])
  e_mask = jnp.stack([p[1] for p in per_expert])
  keys = jax.random.split(key, num_experts)
  e_sample = sampling.SamplingConfig(max_new_tokens=new_tokens // 2)
  from copd_jax import policy_setup, sharding
  run = sharding.RunSharding.one_device(policy_setup.declared_param_axes(cfg))

  e_sampler = sampling.Sampler(cfg, e_sample, group)

  def loop():
    return [sampling.generate(singles[k], e_sampler, sampling.Prompts(e_tokens[k], e_mask[k]),
                              keys[k]) for k in range(num_experts)]
  t = time_side_by_side({
      "stacked": lambda: sampling.stacked_generate(run, stacked, e_sampler,
                                                   sampling.Prompts(e_tokens, e_mask), keys),
      "loop": loop,
  }, repeats)
  results["stacked_vs_loop"] = t["loop"] / t["stacked"]
  print(f"[experts] E={num_experts}, {batch} prompts x G={group} x {new_tokens // 2} tokens each: "
        f"stacked {t['stacked'] * 1e3:.0f} ms, loop {t['loop'] * 1e3:.0f} ms -> "
        f"{results['stacked_vs_loop']:.2f}x")

  # 4. Throughput of the shared-prefix rollout against a matmul peak.
  generated = batch * group * new_tokens
  tokens_per_s = generated / shared_seconds
  flops_per_token = decode_flops_per_token(cfg, prompt_len + new_tokens / 2)
  peak = matmul_peak_flops(args.dtype, 1024 if args.quick else 2048, repeats)
  results.update(
      sampler_tokens_per_s=tokens_per_s,
      model_flops_per_token=flops_per_token,
      achieved_flops_per_s=tokens_per_s * flops_per_token,
      matmul_peak_flops_per_s=peak,
      achieved_over_peak=tokens_per_s * flops_per_token / peak)
  print(f"[throughput] {tokens_per_s:,.0f} sampled tokens/s x {flops_per_token / 1e6:.2f} "
        f"MFLOP/token (decode, mean context {prompt_len + new_tokens // 2}) = "
        f"{tokens_per_s * flops_per_token / 1e9:.2f} GFLOP/s; jnp.dot peak "
        f"{peak / 1e9:.0f} GFLOP/s -> {results['achieved_over_peak']:.2%} of peak")
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in results.items()}))


if __name__ == "__main__":
  main()
