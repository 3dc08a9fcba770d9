"""Qwen3-VL sampling on the committed tiny random checkpoint: the KV cache against
recomputing every row, the vision tower once per prompt, and compiles per grid bucket.

    python experiments/bench_vl.py [--quick]

Last line: JSON with
  vl_kv_cache_speedup     cached sampler time / cache-free sampler time, same prompts, key
                          and length (the cache-free one runs every sample row whole, media
                          included, for every new token); target >= 5
  vision_once_per_prompt  true when the cached sampler's vision tower sees each prompt's
                          patches once (not once per sample)
  compiles_per_bucket     sampler programs compiled over 5 steps that alternate two grid
                          buckets (the image batch, the video batch), per bucket; target <= 1
Scope: the sampler. Training Qwen3-VL branches is not wired in yet, so these figures say
nothing about the update.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_copd import cpu_name  # noqa: E402
from bench_sampler import time_side_by_side  # noqa: E402

from copd_jax import sampling  # noqa: E402
from copd_jax.models import qwen3_vl, qwen3_vl_decode  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                       "fixtures", "hf", "qwen3_vl_tiny")
IMAGE_PAD, VIDEO_PAD = 100, 101


def prompt_batches(cfg) -> dict:
  """The fixture's reference prompts as two grid buckets: 'image' (2 prompts, two images
  in the first) and 'video' (1 prompt, a 2-group video)."""
  with np.load(os.path.join(FIXTURE, "reference.npz")) as ref:
    ref = dict(ref)
  out = {}
  for name, media in (("image", dict(pixel_values=ref["image_pixel_values"],
                                     image_grid_thw=ref["image_grid_thw"])),
                      ("video", dict(pixel_values_videos=ref["video_pixel_values"],
                                     video_grid_thw=ref["video_grid_thw"]))):
    ids, mask = ref[f"{name}_input_ids"], ref[f"{name}_attention_mask"]
    vision = qwen3_vl_decode.vision_inputs(cfg, ids, mask, **media)
    out[name] = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool), vision)
  return out


def tower_patches(fn) -> list[int]:
  """Patches per vision-tower call while fn() traces."""
  with qwen3_vl_decode.vision_tower_calls() as seen:
    jax.block_until_ready(fn())
  return seen


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
  args = parser.parse_args()
  new_tokens, samples, repeats = (24, 4, 3) if args.quick else (64, 8, 5)
  cfg, params = qwen3_vl.load_qwen3_vl(FIXTURE)
  # No stop token: every row decodes the full length, so both samplers do the same work.
  config = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0,
                                   stop_token_ids=(), banned_token_ids=(IMAGE_PAD, VIDEO_PAD))
  batches = prompt_batches(cfg)
  ids, mask, vision = batches["image"]
  key = jax.random.key(0)
  print(f"Qwen3-VL fixture: {ids.shape[0]} prompts of {ids.shape[1]} tokens, G={samples}, "
        f"{new_tokens} new tokens (no stop token: full length); CPU: {cpu_name()}",
        flush=True)

  jit = sampling._generate_jit  # cached sampler programs, counted over the whole run
  programs_at_start = jit._cache_size()
  patches = int(vision.pixel_values.shape[0])
  seen = tower_patches(lambda: sampling.generate(params, cfg, ids, mask, vision, key, config,
                                                 samples))
  once = seen == [patches]
  print(f"vision tower calls of the cached sampler: {seen} patches (the batch has {patches}; "
        f"per sample it would be {samples * patches})", flush=True)

  times = time_side_by_side({
      "cached": lambda: sampling.generate(params, cfg, ids, mask, vision, key, config, samples),
      "recompute": lambda: sampling.generate_by_recompute(params, cfg, ids, mask, vision, key,
                                                          config, samples)}, repeats)
  speedup = times["recompute"] / times["cached"]
  print(f"sampling: cached {times['cached']:.3f} s, recompute {times['recompute']:.3f} s -> "
        f"{speedup:.1f}x", flush=True)

  order = ["image", "video", "image", "video", "image"]
  for step, name in enumerate(order):
    b_ids, b_mask, b_vision = batches[name]
    jax.block_until_ready(sampling.generate(params, cfg, b_ids, b_mask, b_vision,
                                            jax.random.fold_in(key, step), config, samples))
  # Every program the cached sampler compiled in this run (the image bucket's first, above).
  compiled = jit._cache_size() - programs_at_start
  per_bucket = compiled / len(set(order))
  print(f"compiles over {len(order)} steps alternating {len(set(order))} buckets: {compiled}",
        flush=True)
  print(json.dumps({"bench": "qwen3_vl_sampling", "quick": args.quick, "cpu": cpu_name(),
                    "vl_kv_cache_speedup": round(speedup, 2),
                    "vision_once_per_prompt": bool(once),
                    "compiles_per_bucket": per_bucket,
                    "cached_s": round(times["cached"], 4),
                    "recompute_s": round(times["recompute"], 4),
                    "samples_per_prompt": samples, "new_tokens": new_tokens,
                    "scope": "sampler"}))


if __name__ == "__main__":
  main()
