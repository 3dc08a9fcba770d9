"""The decode loop over the shared decoder's KV cache: prefill each prompt once, then one
token per step for all its G rows (one policy, or vmapped over stacked experts), and the
cache-free oracle that recomputes every row. Jitted bodies; the checked entry points are
in sampling.api."""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from copd_jax.models import decoder, lora, qwen3_vl, qwen3_vl_decode
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig
from copd_jax.sampling.tokens import (
  _Buffers,
  _Draw,
  _draw,
  _empty_buffers,
  _keep_decoding,
  _record,
  _sample_and_record,
  _to_rollout,
)


@dataclasses.dataclass(frozen=True)
class _Family:
  """How the sampler drives one model family over the shared decoder's KV cache.

  prefill(params, cfg, tokens, mask, vision) -> (hidden, prefix_kv);
  first_positions(mask, vision) -> int32[B], the first generated token's position;
  decode_step(params, cfg, tokens, positions, prefix_mask, cache, write_index);
  lm_head(params, cfg); cast(params, cfg): matmul kernels in the compute dtype;
  forward_hidden(params, cfg, tokens, token_mask, vision, num_samples, num_new): a whole-row
    forward of [prompt | generated] rows (the cache-free oracle; vision per row)."""
  prefill: Callable
  first_positions: Callable
  decode_step: Callable
  lm_head: Callable
  cast: Callable
  forward_hidden: Callable


_POLICY = _Family(
    prefill=lambda params, cfg, tokens, mask, vision: decoder.prefill(
        params, cfg, tokens, decoder.positions_from_mask(mask), mask, vision),
    first_positions=lambda mask, vision: mask.sum(-1, dtype=jnp.int32),
    decode_step=decoder.decode_step, lm_head=decoder.lm_head,
    cast=decoder.cast_matmul_kernels,
    forward_hidden=lambda params, cfg, tokens, token_mask, vision, *_: decoder.forward_hidden(
        params, cfg, tokens, decoder.positions_from_mask(token_mask), token_mask, vision))


def _vl_forward_hidden(params, cfg, tokens, token_mask, vision, prompt_vision, num_new):
  # prompt_vision: the B prompts' VisionInputs (positions); vision: media repeated per row.
  b = prompt_vision.position_ids.shape[1]
  g = tokens.shape[0] // b
  prompt_mask = token_mask[::g, :prompt_vision.position_ids.shape[2]]
  positions = qwen3_vl_decode.sequence_positions(prompt_mask, prompt_vision, g, num_new)
  return qwen3_vl.forward_hidden(params, cfg, tokens, token_mask.astype(jnp.int32), positions,
                                 vision.pixel_values, vision.image_grids,
                                 vision.pixel_values_videos, vision.video_grids)


_QWEN3_VL = _Family(
    prefill=qwen3_vl_decode.prefill, first_positions=qwen3_vl_decode.first_decode_positions,
    decode_step=qwen3_vl_decode.decode_step, lm_head=qwen3_vl.lm_head,
    cast=lambda params, cfg: decoder.cast_matmul_kernels(params, cfg.text),
    forward_hidden=_vl_forward_hidden)


def _family(cfg) -> _Family:
  return _QWEN3_VL if isinstance(cfg, Qwen3VLConfig) else _POLICY


@flax.struct.dataclass
class _DecodeState:
  """What the decode loop carries for one policy (a leading E axis when stacked)."""
  cache: tuple  # of model.LayerCache: prefix [B, K, P, Dh] shared, response [N, K, R, Dh]
  prefix_mask: jax.Array  # bool[B, P]
  next_position: jax.Array  # int32[N], position of each row's first generated token
  bufs: _Buffers


def _start(params, cfg, prompt_tokens, prompt_mask, vision, key, sampling, num_samples):
  """Prefill each prompt once, share its keys with its G rows, draw token 0 of every row."""
  prompt_mask = prompt_mask.astype(bool)
  g = num_samples
  family = _family(cfg)
  hidden, prefix_kv = family.prefill(params, cfg, prompt_tokens, prompt_mask, vision)
  # Left padding: the last column holds every prompt's last token.
  logits = decoder.logits_from_hidden(hidden[:, -1], family.lm_head(params, cfg))
  n = prompt_tokens.shape[0] * g
  bufs = _sample_and_record(_empty_buffers(n, sampling.max_new_tokens),
                            jnp.repeat(logits, g, axis=0), key, 0, sampling)
  return _DecodeState(
      cache=decoder.init_decode_cache(prefix_kv, g, sampling.max_new_tokens),
      prefix_mask=prompt_mask,
      next_position=jnp.repeat(family.first_positions(prompt_mask, vision), g),
      bufs=bufs)


def _next_draw(params, cfg, state: _DecodeState, prev, key, sampling, step):
  """Runs token step-1 (prev int32[N, 1], response slot step-1) and draws token `step`.

  Reads the state only; returns (the new keys/values per layer, the draw). Vmappable."""
  family = _family(cfg)
  hidden, new_kv = family.decode_step(params, cfg, prev,
                                      (state.next_position + step - 1)[:, None],
                                      state.prefix_mask, state.cache, step - 1)
  logits = decoder.logits_from_hidden(hidden[:, 0], family.lm_head(params, cfg))
  return new_kv, _draw(logits, key, step, state.bufs.done, sampling)


def _store(state: _DecodeState, new_kv, draw: _Draw, step) -> _DecodeState:
  """The in-place writes of a step (works with or without a leading expert axis)."""
  return state.replace(cache=decoder.write_decode_cache(state.cache, new_kv, step - 1),
                       bufs=_record(state.bufs, draw, step))


def _previous_tokens(state: _DecodeState, step):
  """Token step-1 of every row: int32[..., N, 1]."""
  return jax.lax.dynamic_slice_in_dim(state.bufs.tokens, step - 1, 1, axis=-1)


def _decode_loop(advance, state: _DecodeState, max_new_tokens: int) -> _Buffers:
  """Runs advance(step, state) for step = 1, 2, ... while _keep_decoding."""
  _, state = jax.lax.while_loop(
      lambda carry: _keep_decoding(carry[0], carry[1].bufs, max_new_tokens),
      lambda carry: (carry[0] + 1, advance(carry[0], carry[1])),
      (jnp.int32(1), state))
  return state.bufs


def _generate_one(params, cfg, prompt_tokens, prompt_mask, vision, key, sampling, num_samples):
  params = _family(cfg).cast(params, cfg)  # once, not on every decode step
  state = _start(params, cfg, prompt_tokens, prompt_mask, vision, key, sampling, num_samples)

  def advance(step, st):
    new_kv, draw = _next_draw(params, cfg, st, _previous_tokens(st, step), key, sampling, step)
    return _store(st, new_kv, draw, step)
  bufs = _decode_loop(advance, state, sampling.max_new_tokens)
  return _to_rollout(bufs, prompt_tokens.shape[0], num_samples)


def _stacked_generate_one(stacked, cfg, prompt_tokens, prompt_mask, vision, keys, sampling,
                          num_samples):
  # Only the per-expert compute is vmapped. The loop stays outside, so its predicate is one
  # scalar (a vmapped while_loop with per-expert predicates selects -- copies -- the whole
  # carry every step), and so do the cache/buffer writes (a vmapped dynamic_update_slice
  # becomes a scatter that copies the cache every step).
  stacked = _family(cfg).cast(stacked, cfg)
  params_axes = lora.branch_axes(stacked)  # LoRA branches: the shared base is not mapped
  state = jax.vmap(lambda prm, tok, m, vis, key: _start(prm, cfg, tok, m, vis, key, sampling,
                                                        num_samples),
                   in_axes=(params_axes, 0, 0, 0, 0))(
      stacked, prompt_tokens, prompt_mask, vision, keys)

  def advance(step, st):
    new_kv, draw = jax.vmap(
        lambda prm, s, prev, key: _next_draw(prm, cfg, s, prev, key, sampling, step),
        in_axes=(params_axes, 0, 0, 0))(stacked, st, _previous_tokens(st, step), keys)
    return _store(st, new_kv, draw, step)
  bufs = _decode_loop(advance, state, sampling.max_new_tokens)
  return jax.vmap(lambda bf: _to_rollout(bf, prompt_tokens.shape[1], num_samples))(bufs)


def _generate_by_recompute_one(params, cfg, prompt_tokens, prompt_mask, vision, key, sampling,
                               num_samples, row_vision=None):
  """The cache-free oracle: a full forward over [N, P+R] for every new token.
  row_vision: Qwen3-VL only, the media repeated for every sample row (repeat_samples)."""
  family = _family(cfg)
  b, p = prompt_tokens.shape
  g, r = num_samples, sampling.max_new_tokens
  n = b * g
  head = family.lm_head(params, cfg)
  prompt_vision = vision
  prompt_mask = jnp.repeat(prompt_mask.astype(bool), g, axis=0)
  sequence = jnp.concatenate([jnp.repeat(prompt_tokens, g, axis=0),
                              jnp.zeros((n, r), prompt_tokens.dtype)], axis=1)
  if row_vision is not None:
    vision = row_vision
  elif vision is not None:
    vision = jnp.repeat(vision, g, axis=0)

  def step_fn(state):
    step, sequence, bufs = state  # draw token `step` from the hidden at column P+step-1
    generated = jnp.broadcast_to(jnp.arange(r)[None, :] < step, (n, r))
    token_mask = jnp.concatenate([prompt_mask, generated], axis=1)
    hidden = family.forward_hidden(params, cfg, sequence, token_mask, vision, prompt_vision, r)
    last = jax.lax.dynamic_index_in_dim(hidden, p + step - 1, axis=1, keepdims=False)
    bufs = _sample_and_record(bufs, decoder.logits_from_hidden(last, head), key, step,
                              sampling)
    sequence = jax.lax.dynamic_update_slice_in_dim(
        sequence, jax.lax.dynamic_index_in_dim(bufs.tokens, step, axis=1), p + step, axis=1)
    return step + 1, sequence, bufs

  _, _, bufs = jax.lax.while_loop(lambda s: _keep_decoding(s[0], s[2], r), step_fn,
                                  (jnp.int32(0), sequence, _empty_buffers(n, r)))
  return _to_rollout(bufs, b, g)


_STATIC = ("cfg", "sampling", "num_samples")
_generate_jit = jax.jit(_generate_one, static_argnames=_STATIC)
_generate_by_recompute_jit = jax.jit(_generate_by_recompute_one, static_argnames=_STATIC)
