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
  training_compiles_per_bucket
                          update programs compiled over 5 CoPD update steps (image and video
                          branch, OPD between them) whose prompts change every step (images
                          of two sizes, text only, video, video + image), all within one
                          vision budget (PromptMedia): one bucket; target <= 1
  training_vision_once_per_prompt
                          true when the update's vision tower sees prompts, never sample rows
  teacher_tower_prompt_slots, teacher_real_prompts
                          per teacher (2 branches teaching each other 2 cross prompts each):
                          the prompt slots its vision tower runs on in teacher scoring, and
                          the real prompts it is assigned (equal: no padded vision work)
  teacher_bytes_per_vision_token
                          what a cross row's media cost to move to its teacher, per merged
                          vision token: "pixels" (the merge^2 f32 patches we send) or
                          "features" (the merged embedding plus one DeepStack feature per
                          injected layer, bf16), for the fixture and the Qwen3-VL-4B shape
Scope: the sampler and the jitted update (teacher scoring included); the run loop over
records is tests/test_qwen3_vl_run.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_copd import cpu_name  # noqa: E402
from bench_sampler import time_side_by_side  # noqa: E402

from copd_jax import kernels, sampling  # noqa: E402
from copd_jax.sampling import decode as sampling_decode  # noqa: E402
from copd_jax.models import qwen3_vl_decode, qwen3_vl_import  # noqa: E402
from copd_jax import losses  # noqa: E402
from copd_jax.rl import rollout as rollout_lib, rows as rows_lib  # noqa: E402
from copd_jax.rl import scoring, stages, update as update_lib  # noqa: E402

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


def budget_prompts(cfg, length: int = 23) -> list[tuple]:
  """The fixture's 4 reference prompts (two images of different sizes; text only; a
  video; a video and an image), left-padded to `length`, each with its media dict."""
  with np.load(os.path.join(FIXTURE, "reference.npz")) as ref:
    ref = dict(ref)
  first = int(np.prod(ref["image_grid_thw"][0]))
  video = dict(pixel_values_videos=ref["video_pixel_values"], video_grid_thw=ref["video_grid_thw"])
  items = [("image", 0, dict(pixel_values=ref["image_pixel_values"],
                             image_grid_thw=ref["image_grid_thw"])),
           ("image", 1, {}), ("video", 0, video),
           ("mixed", 0, dict(video, pixel_values=ref["image_pixel_values"][first:],
                             image_grid_thw=ref["image_grid_thw"][1:]))]
  out = []
  for name, row, media in items:
    ids, mask = ref[f"{name}_input_ids"][row], ref[f"{name}_attention_mask"][row]
    pad = length - len(ids)
    out.append((np.pad(ids, (pad, 0)), np.pad(mask, (pad, 0)), media))
  return out


def step_rows(cfg, stacked, prompts, step: int, samples: int, budget: int, run, config):
  """(rows [2, 4*G, ...], prompt ids [2, 4, P]) of one training step: each of the two
  students samples on 4 of the reference prompts (a rotation per step); the last 2 are its
  cross prompts (beta 1)."""
  ids, mask, media = [], [], []
  for k in range(2):  # each student: 4 of the prompts, a different rotation each step
    chosen = [prompts[(step + k + i) % 4] for i in range(4)]
    ids.append(np.stack([c[0] for c in chosen]))
    mask.append(np.stack([c[1] for c in chosen]))
    media.append(qwen3_vl_decode.prompt_media(cfg, ids[-1], mask[-1], [c[2] for c in chosen],
                                              budget))
  ids, mask = jnp.asarray(np.stack(ids), jnp.int32), jnp.asarray(np.stack(mask), bool)
  media = jax.tree.map(lambda *xs: jnp.stack(xs), *media)
  prompts_ = sampling.Prompts(ids, mask, media)
  rollout = sampling.stacked_generate(run, stacked, sampling.Sampler(cfg, config, samples),
                                      prompts_, jax.random.split(jax.random.key(step), 2))
  beta = np.zeros((2, 4 * samples), np.float32)
  beta[:, 2 * samples:] = 1.0
  return rollout_lib.build_rows(prompts_, rollout, np.zeros((2, 4 * samples)), beta), ids


def teacher_tower_prompts(cfg, params, samples: int, budget: int = 64) -> dict:
  """What a teacher's vision tower sees in teacher scoring (score_by_teachers traced alone,
  two branches teaching each other 2 cross prompts each): prompt slots per tower call
  (one call per teacher, vmapped) against the real prompts each teacher is assigned."""
  from copd_jax import policy_setup, sharding
  stacked = jax.tree.map(lambda x: jnp.stack([x, x * 1.01]), params)
  u = rows_lib.UpdateConfig(model=cfg, loss=losses.PolicyLossConfig(),
                            kernel=kernels.KernelConfig(backend="chunked", vocab_tile=32,
                                                        token_tile=64),
                            samples_per_prompt=samples)
  run = sharding.RunSharding.one_device(policy_setup.declared_param_axes(cfg))
  config = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, stop_token_ids=(2,),
                                   banned_token_ids=(IMAGE_PAD, VIDEO_PAD))
  rows, ids = step_rows(cfg, stacked, budget_prompts(cfg), 0, samples, budget, run, config)
  routing = stages.teacher_routing(np.array([[1, 1], [0, 0]], np.int32), 2, samples=samples,
                                   native_rows=2 * samples)
  with qwen3_vl_decode.vision_tower_calls() as calls:
    jax.make_jaxpr(lambda p, r, ro: scoring.score_by_teachers(
        scoring.Teachers(p, ro, 2 * samples), r, u))(stacked, rows, routing.as_arrays())
  return {"tower_prompt_slots_per_teacher": [c[0] for c in calls],
          "real_prompts_per_teacher": [n // samples for n in routing.teacher_loads()]}


def training_compiles(cfg, params, samples: int, steps: int = 5, budget: int = 64):
  """(update programs compiled, tower calls seen, seconds per update after the first) over
  `steps` updates of two branches (image, video) with OPD between them; each step every
  student takes 2 native and 2 cross prompts from the 4 reference prompts, rotated."""
  prompts = budget_prompts(cfg)
  stacked = jax.tree.map(lambda x: jnp.stack([x, x * 1.01]), params)
  u = rows_lib.UpdateConfig(model=cfg, loss=losses.PolicyLossConfig(),
                            kernel=kernels.KernelConfig(backend="chunked", vocab_tile=32,
                                                        token_tile=64),
                            samples_per_prompt=samples)
  optimizer = update_lib.make_optimizer(1e-4, 1.0)
  state = update_lib.TrainState(stacked, update_lib.init_optimizer_state(optimizer, stacked))
  routing = stages.teacher_routing(np.array([[1, 1], [0, 0]], np.int32), 2, samples=samples,
                                   native_rows=2 * samples).as_arrays()
  config = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, stop_token_ids=(2,),
                                   banned_token_ids=(IMAGE_PAD, VIDEO_PAD))
  from copd_jax import policy_setup, sharding
  run = sharding.RunSharding.one_device(policy_setup.declared_param_axes(cfg))
  fn = update_lib.UpdateFn(run, u, optimizer)
  traced, real_body = [], update_lib.update_body  # each trace of the update is a compile
  update_lib.update_body = lambda *a, **k: (traced.append(1), real_body(*a, **k))[1]
  seen, times = [], []
  for step in range(steps):
    rows, _ = step_rows(cfg, state.params, prompts, step, samples, budget, run, config)
    start = time.perf_counter()
    with qwen3_vl_decode.vision_tower_calls() as calls:
      teachers = scoring.Teachers(state.params, routing, 2 * samples)
      state, _ = jax.block_until_ready(update_lib.update(fn, state, rows, teachers))
    times.append(time.perf_counter() - start)
    seen += calls
  update_lib.update_body = real_body
  return len(traced), seen, float(np.mean(times[1:]))


def tower_patches(fn) -> list[int]:
  """Patches per vision-tower call while fn() traces."""
  with qwen3_vl_decode.vision_tower_calls() as seen:
    jax.block_until_ready(fn())
  return seen


# Qwen3-VL-4B-Instruct's published vision / text shape (config.json): patch 16, temporal
# patch 2, 3 channels, merge 2 x 2, text hidden size 2560, DeepStack into 3 layers.
QWEN3_VL_4B = dict(patch_dim=3 * 2 * 16 * 16, merge_unit=4, d_model=2560, deepstack=3)


def teacher_bytes_per_vision_token(patch_dim: int, merge_unit: int, d_model: int,
                                   deepstack: int) -> dict:
  """Bytes per merged vision token of the two ways to give a teacher a prompt's media.
  Only pixels are correct while the branches train their own vision towers: features
  made by the student's tower are not the teacher's."""
  return {"pixels": merge_unit * patch_dim * 4, "features": d_model * (1 + deepstack) * 2}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
  args = parser.parse_args()
  new_tokens, samples, repeats = (24, 4, 3) if args.quick else (64, 8, 5)
  cfg, params = qwen3_vl_import.load_qwen3_vl(FIXTURE)
  # No stop token: every row decodes the full length, so both samplers do the same work.
  config = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0,
                                   stop_token_ids=(), banned_token_ids=(IMAGE_PAD, VIDEO_PAD))
  batches = prompt_batches(cfg)
  ids, mask, vision = batches["image"]
  image_prompts = sampling.Prompts(ids, mask, vision)
  sampler = sampling.Sampler(cfg, config, samples)
  key = jax.random.key(0)
  print(f"Qwen3-VL fixture: {ids.shape[0]} prompts of {ids.shape[1]} tokens, G={samples}, "
        f"{new_tokens} new tokens (no stop token: full length); CPU: {cpu_name()}",
        flush=True)

  jit = sampling_decode._generate_jit  # cached sampler programs, counted over the whole run
  programs_at_start = jit._cache_size()
  patches = int(vision.pixel_values.shape[0])
  seen = tower_patches(lambda: sampling.generate(params, sampler, image_prompts, key))
  once = seen == [patches]
  print(f"vision tower calls of the cached sampler: {seen} patches (the batch has {patches}; "
        f"per sample it would be {samples * patches})", flush=True)

  times = time_side_by_side({
      "cached": lambda: sampling.generate(params, sampler, image_prompts, key),
      "recompute": lambda: sampling.generate_by_recompute(params, sampler, image_prompts, key)},
      repeats)
  speedup = times["recompute"] / times["cached"]
  print(f"sampling: cached {times['cached']:.3f} s, recompute {times['recompute']:.3f} s -> "
        f"{speedup:.1f}x", flush=True)

  order = ["image", "video", "image", "video", "image"]
  for step, name in enumerate(order):
    jax.block_until_ready(sampling.generate(params, sampler, sampling.Prompts(*batches[name]),
                                            jax.random.fold_in(key, step)))
  # Every program the cached sampler compiled in this run (the image bucket's first, above).
  compiled = jit._cache_size() - programs_at_start
  per_bucket = compiled / len(set(order))
  print(f"compiles over {len(order)} steps alternating {len(set(order))} buckets: {compiled}",
        flush=True)
  compiled_updates, update_towers, update_s = training_compiles(cfg, params, samples)
  per_prompt = bool(update_towers) and all(
      isinstance(c, tuple) and c[0] <= 4 for c in update_towers)  # <= 4 prompts, 4*G rows
  print(f"training: {compiled_updates} update program(s) over 5 steps; tower calls "
        f"(prompts, patches): {update_towers}; {update_s:.3f} s per update", flush=True)
  teacher_towers = teacher_tower_prompts(cfg, params, samples)
  print(f"teacher scoring: vision-tower prompt slots per teacher "
        f"{teacher_towers['tower_prompt_slots_per_teacher']}, real prompts per teacher "
        f"{teacher_towers['real_prompts_per_teacher']}", flush=True)
  media_bytes = {
      "fixture": teacher_bytes_per_vision_token(cfg.vision.patch_dim, cfg.vision.merge_unit,
                                                cfg.text.d_model,
                                                len(cfg.vision.deepstack_visual_indexes)),
      "qwen3_vl_4b": teacher_bytes_per_vision_token(**QWEN3_VL_4B)}
  print(f"bytes per vision token to a teacher: {media_bytes}", flush=True)
  print(json.dumps({"bench": "qwen3_vl_sampling", "quick": args.quick, "cpu": cpu_name(),
                    "vl_kv_cache_speedup": round(speedup, 2),
                    "vision_once_per_prompt": bool(once),
                    "compiles_per_bucket": per_bucket,
                    "cached_s": round(times["cached"], 4),
                    "recompute_s": round(times["recompute"], 4),
                    "training_compiles_per_bucket": compiled_updates,
                    "training_vision_once_per_prompt": per_prompt,
                    "update_s": round(update_s, 3),
                    "teacher_bytes_per_vision_token": media_bytes,
                    "teacher_tower_prompt_slots": teacher_towers[
                        "tower_prompt_slots_per_teacher"],
                    "teacher_real_prompts": teacher_towers["real_prompts_per_teacher"],
                    "samples_per_prompt": samples, "new_tokens": new_tokens,
                    "scope": "sampler and update"}))


if __name__ == "__main__":
  main()
