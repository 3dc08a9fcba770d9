"""Qwen3-VL in the sampler: a prompt batch's media as one pytree (VisionInputs), the prompt
pass (prefill: the vision tower once per prompt, the prompt's keys for the cache) and the
decode step of generated text tokens, over the shared decoder's KV cache.

Positions: prompt tokens take get_rope_index's 3-D (t, h, w) positions; generated tokens are
text, so t = h = w, continuing one past the prompt's largest position (what HF's
`rope_deltas` encode). Grids are static: a batch with other grids compiles another program.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from copd_jax.models import decoder, lora
from copd_jax.models.qwen3_vl import (
  Qwen3VL,
  VisionTower,
  _module,
  check_inputs,
  get_rope_index,
  vision_layout,
)
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig, grids_to_tuple

Params = Any


@flax.struct.dataclass
class VisionInputs:
  """A prompt batch's media, in prompt order across the batch.

  position_ids: int32[3, B, P] the prompts' (t, h, w) positions (get_rope_index);
  pixel_values / pixel_values_videos: f32[N, patch_dim] or None (vision_preprocess);
  image_grids / video_grids: their (t, h, w) grids, static (part of the compiled program).
  """
  position_ids: jax.Array
  pixel_values: jax.Array | None = None
  pixel_values_videos: jax.Array | None = None
  image_grids: tuple = flax.struct.field(pytree_node=False, default=())
  video_grids: tuple = flax.struct.field(pytree_node=False, default=())


def vision_inputs(cfg: Qwen3VLConfig, input_ids, attention_mask, pixel_values=None,
                  image_grid_thw=None, pixel_values_videos=None,
                  video_grid_thw=None) -> VisionInputs:
  """Host side: checks a LEFT-padded prompt batch against its media (errors name the
  argument) and computes its 3-D positions. input_ids, attention_mask: int[B, P]."""
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
  image_grids = grids_to_tuple(image_grid_thw, "image_grid_thw")
  video_grids = grids_to_tuple(video_grid_thw, "video_grid_thw")
  check_inputs(cfg, ids, mask, pixel_values, image_grids, pixel_values_videos, video_grids)
  position_ids, _ = get_rope_index(cfg, ids, mask, image_grid_thw, video_grid_thw)
  as_f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return VisionInputs(jnp.asarray(position_ids, jnp.int32), as_f32(pixel_values),
                      as_f32(pixel_values_videos), image_grids, video_grids)


@flax.struct.dataclass
class PromptMedia:
  """Each prompt's media padded to a fixed vision budget of N patches, so prompts with
  images and videos of any size share one compiled program. Leading axes (written [B])
  are the prompts'; in training rows they are [S, R] like every other row array.

  patches: f32[B, N, patch_dim] -- the prompt's image patches, then its video patches
    (processor order), then zeros;
  layout: (interp_index int32[B, N, 4], interp_weight f32[B, N, 4], rotary_rc
    int32[B, N, 2], segment int32[B, N]) -- vision_layout of the prompt's grids, padding
    patches in a segment of their own (-1);
  image_tokens: int32[B] -- how many of the prompt's vision tokens are images (its video
    tokens follow);
  position_ids: int32[B, 3, P] -- the prompt's (t, h, w) positions (get_rope_index).
  """
  patches: jax.Array
  layout: tuple
  image_tokens: jax.Array
  position_ids: jax.Array


def _media_of(cfg: Qwen3VLConfig, where: str, item: dict, budget: int):
  """One prompt's (patches, layout, image tokens) padded to `budget` patches; errors name
  `where`."""
  vcfg = cfg.vision
  image_grids = grids_to_tuple(item.get("image_grid_thw"), f"{where}: image_grid_thw")
  video_grids = grids_to_tuple(item.get("video_grid_thw"), f"{where}: video_grid_thw")
  pieces = [np.asarray(item[k], np.float32) for k in ("pixel_values", "pixel_values_videos")
            if item.get(k) is not None]
  patches = np.concatenate(pieces) if pieces else np.zeros((0, vcfg.patch_dim), np.float32)
  if len(patches) > budget:
    raise ValueError(f"{where}: its images and videos make {len(patches)} patches, more "
                     f"than the vision budget of {budget} patches per prompt; resize the "
                     "media or raise the budget")
  pad = budget - len(patches)
  if image_grids or video_grids:
    index, weight, rc, segment = vision_layout(image_grids + video_grids, vcfg)
  else:  # a text-only prompt: every patch is padding
    index, weight = np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32)
    rc, segment = np.zeros((0, 2), np.int32), np.zeros((0,), np.int32)
  layout = (np.pad(index, [(0, pad), (0, 0)]), np.pad(weight, [(0, pad), (0, 0)]),
            np.pad(rc, [(0, pad), (0, 0)]), np.pad(segment, [(0, pad)], constant_values=-1))
  image_tokens = sum(t * h * w for t, h, w in image_grids) // vcfg.merge_unit
  return np.pad(patches, [(0, pad), (0, 0)]), layout, image_tokens


def prompt_media(cfg: Qwen3VLConfig, input_ids, attention_mask, media: Sequence[dict],
                 budget: int, names: Sequence[str] | None = None) -> PromptMedia:
  """Host side: a LEFT-padded prompt batch int[B, P] and each prompt's media (media[b]: a
  dict with any of pixel_values / image_grid_thw / pixel_values_videos / video_grid_thw,
  as vision_preprocess makes them) -> PromptMedia with `budget` patches per prompt.
  Errors name the prompt: media over the budget, a grid the merger cannot split, a
  placeholder count that disagrees with the media. names: what errors call each prompt
  (e.g. its record); default "prompt b"."""
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
  if len(media) != len(ids):
    raise ValueError(f"media has {len(media)} entries for {len(ids)} prompts")
  if budget <= 0 or budget % cfg.vision.merge_unit:
    raise ValueError(f"the vision budget ({budget} patches) must be a positive multiple of "
                     f"merge_size^2 = {cfg.vision.merge_unit}")
  out, positions = [], []
  for b, item in enumerate(media):
    where = names[b] if names is not None else f"prompt {b}"
    try:
      check_inputs(cfg, ids[b:b + 1], mask[b:b + 1], item.get("pixel_values"),
                   grids_to_tuple(item.get("image_grid_thw"), "image_grid_thw"),
                   item.get("pixel_values_videos"),
                   grids_to_tuple(item.get("video_grid_thw"), "video_grid_thw"))
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e
    out.append(_media_of(cfg, where, item, budget))
    position_ids, _ = get_rope_index(cfg, ids[b:b + 1], mask[b:b + 1],
                                     item.get("image_grid_thw"), item.get("video_grid_thw"))
    positions.append(np.asarray(position_ids)[:, 0])
  patches, layouts, image_tokens = zip(*out)
  layout = tuple(jnp.asarray(np.stack(parts)) for parts in zip(*layouts))
  return PromptMedia(jnp.asarray(np.stack(patches)), layout,
                     jnp.asarray(image_tokens, jnp.int32),
                     jnp.asarray(np.stack(positions), jnp.int32))


def _position_ids(vision) -> jax.Array:
  """int32[3, B, P] of VisionInputs or PromptMedia."""
  if isinstance(vision, PromptMedia):
    return jnp.moveaxis(vision.position_ids, -2, 0)
  return vision.position_ids


def prefill(params: Params, cfg: Qwen3VLConfig, tokens, token_mask, vision,
            constrain: Callable | None = None):
  """The prompt pass: (hidden f32[B, P, D], per-layer (k, v) [B, K, P, Dh]).
  vision: VisionInputs (the batch's media in one tower call) or PromptMedia (per prompt);
  constrain: the residual stream's constraint (decoder.Decoder.constrain)."""
  if isinstance(vision, PromptMedia):
    return _module(cfg, constrain).apply(lora.variables(params), tokens,
                                         token_mask.astype(bool), vision,
                                         method=Qwen3VL.forward_prompts)
  return _module(cfg, constrain).apply(lora.variables(params), tokens, token_mask.astype(bool),
                                       vision.position_ids, vision.pixel_values,
                                       vision.image_grids, vision.pixel_values_videos,
                                       vision.video_grids)


def first_decode_positions(token_mask, vision):
  """int32[B]: the position of each prompt's first generated token (max position + 1)."""
  valid = jnp.where(token_mask.astype(bool)[None], _position_ids(vision), 0)
  return valid.max(axis=(0, 2)).astype(jnp.int32) + 1


def forward_hidden_shared_prefix(params: Params, cfg: Qwen3VLConfig, prompt_tokens,
                                 prompt_mask, media: PromptMedia, tokens,
                                 constrain: Callable | None = None):
  """Teacher forcing of G continuations per prompt, each prompt (and its media) run once.

  prompt_tokens: int32[B, P]; prompt_mask: bool[B, P]; media: PromptMedia [B];
  tokens: int32[N, R], N = B*G, row b*G + j continues prompt b (text: positions continue
  one past the prompt's largest, as in sampling). Returns (prompt hidden f32[B, P, D],
  continuation hidden f32[N, R, D]) -- as decoder.forward_hidden_shared_prefix."""
  prompt_hidden, prefix_kv = prefill(params, cfg, prompt_tokens, prompt_mask, media, constrain)
  g = tokens.shape[0] // prompt_tokens.shape[0]
  cache = decoder.init_decode_cache(prefix_kv, g, 0)
  start = jnp.repeat(first_decode_positions(prompt_mask, media), g)
  positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  hidden, _ = decode_step(params, cfg, tokens, positions, prompt_mask, cache, 0, constrain)
  return prompt_hidden, hidden


def decode_step(params: Params, cfg: Qwen3VLConfig, tokens, positions, prefix_mask, cache,
                write_index, constrain: Callable | None = None):
  """Generated tokens int32[N, T] at 1-D positions int32[N, T] over the prompts' cache
  (as decoder.decode_step): (hidden f32[N, T, D], their (k, v))."""
  return _module(cfg, constrain).apply(lora.variables(params), tokens, positions,
                                       prefix_mask.astype(bool), cache, write_index,
                                       method=Qwen3VL.decode_tokens)


def sequence_positions(token_mask, vision: VisionInputs, num_samples: int, num_new: int):
  """int32[3, N, P + R]: positions of [prompt | R generated tokens] for the N = B*G rows
  (row b*G + j continues prompt b), for a cache-free forward over whole rows."""
  prompt = jnp.repeat(vision.position_ids, num_samples, axis=1)
  start = jnp.repeat(first_decode_positions(token_mask, vision), num_samples)
  new = start[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None]
  return jnp.concatenate([prompt, jnp.broadcast_to(new[None], (3,) + new.shape)], axis=2)


def _runs(row: np.ndarray, token_id: int) -> int:
  """How many maximal runs of token_id a row holds (one per image, per video frame group)."""
  hit = row == token_id
  return int(np.sum(hit[1:] & ~hit[:-1]) + hit[0]) if len(row) else 0


def repeat_samples(cfg: Qwen3VLConfig, vision: VisionInputs, input_ids,
                   num_samples: int) -> VisionInputs:
  """The batch's media with each prompt's images and videos repeated for its G sample rows
  (row b*G + j = prompt b), for running every sample whole (host side; a baseline)."""
  ids = np.asarray(input_ids)
  out = {}
  for name, grids_name, token_id, per_item in (
      ("pixel_values", "image_grids", cfg.image_token_id, lambda g: 1),
      ("pixel_values_videos", "video_grids", cfg.video_token_id, lambda g: g[0])):
    patches, grids = getattr(vision, name), getattr(vision, grids_name)
    if patches is None:
      out[name], out[grids_name] = None, ()
      continue
    sizes = [t * h * w for t, h, w in grids]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pieces, new_grids, item = [], [], 0
    for row in ids:
      runs, count = _runs(row, token_id), 0
      first = item
      while count < runs:  # an image is one run; a video one run per temporal patch
        count += per_item(grids[item])
        item += 1
      block = np.asarray(patches)[starts[first]:starts[item]]
      pieces += [block] * num_samples
      new_grids += list(grids[first:item]) * num_samples
    out[name] = jnp.asarray(np.concatenate(pieces), jnp.float32)
    out[grids_name] = tuple(new_grids)
  return VisionInputs(jnp.repeat(vision.position_ids, num_samples, axis=1), **out)


@contextlib.contextmanager
def vision_tower_calls():
  """Yields a list that records, per vision-tower call traced inside the block, how many
  patches the tower received: N for a whole batch's media, (prompts, patches per prompt)
  for PromptMedia (a program already compiled is not traced again)."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, VisionTower) and context.method_name == "__call__":
      shape = tuple(int(n) for n in args[0].shape[:-1])  # [N] or, per prompt, [B, N]
      seen.append(shape[0] if len(shape) == 1 else shape)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    yield seen
