"""The decode loop over the shared decoder's KV cache: prefill each prompt once, then one
token per step for all its G rows (one policy, or vmapped over stacked experts), and the
cache-free oracle that recomputes every row. Jitted bodies; the checked entry points are
in sampling.api. The model is a models.policy.Policy (static): its prefill, decode_step and
lm_head drive the loop."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from copd_jax.models import decoder, lora
from copd_jax.sampling.tokens import (
  Prompts,
  _Buffers,
  _Draw,
  _draw,
  _empty_buffers,
  _keep_decoding,
  _record,
  _sample_and_record,
  _to_rollout,
)


@flax.struct.dataclass
class _DecodeState:
  """What the decode loop carries for one policy (a leading E axis when stacked)."""
  cache: tuple  # of models.decoder.LayerCache: prefix [B, K, P, Dh] shared, response [N, K, R, Dh]
  prefix_mask: jax.Array  # bool[B, P]
  next_position: jax.Array  # int32[N], position of each row's first generated token
  bufs: _Buffers


def _start(params, sampler, prompts: Prompts, key):
  """Prefill each prompt once, share its keys with its G rows, draw token 0 of every row.
  sampler: the sampling.api.Sampler (policy, config, num_samples); prompts [B, P]."""
  policy, sampling, g = sampler.policy, sampler.config, sampler.num_samples
  prompt_mask = prompts.mask.astype(bool)
  hidden, prefix_kv = policy.prefill(params, prompts.tokens, prompt_mask, prompts.media)
  # Left padding: the last column holds every prompt's last token.
  logits = decoder.logits_from_hidden(hidden[:, -1], policy.lm_head(params))
  n = prompts.tokens.shape[0] * g
  bufs = _sample_and_record(_empty_buffers(n, sampling.max_new_tokens),
                            jnp.repeat(logits, g, axis=0), key, 0, sampling)
  return _DecodeState(
      cache=decoder.init_decode_cache(prefix_kv, g, sampling.max_new_tokens),
      prefix_mask=prompt_mask,
      next_position=jnp.repeat(policy.first_positions(prompt_mask, prompts.media), g),
      bufs=bufs)


def _next_draw(params, sampler, state: _DecodeState, key, step):
  """Runs token step-1 (response slot step-1, read from the state's buffers) and draws
  token `step`.

  Returns (per layer the response slots with the new keys/values written in, or with
  scanned layers the new keys/values alone (see decoder.write_decode_cache), the draw).
  Reads the state only. Vmappable."""
  policy = sampler.policy
  prev = _previous_tokens(state, step)  # int32[N, 1]
  hidden, new_kv = policy.decode_step(params, prev, (state.next_position + step - 1)[:, None],
                                      state.prefix_mask, state.cache, step - 1)
  logits = decoder.logits_from_hidden(hidden[:, 0], policy.lm_head(params))
  return new_kv, _draw(logits, key, step, state.bufs.done, sampler.config)


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


def _generate_one(params, sampler, prompts: Prompts, key):
  """One policy's rollout [B, G, R] of prompts [B, P] (the body of sampling.generate)."""
  params = sampler.policy.cast(params)  # once, not on every decode step
  state = _start(params, sampler, prompts, key)

  def advance(step, st):
    new_kv, draw = _next_draw(params, sampler, st, key, step)
    return _store(st, new_kv, draw, step)
  bufs = _decode_loop(advance, state, sampler.config.max_new_tokens)
  return _to_rollout(bufs, prompts.tokens.shape[0], sampler.num_samples)


def _stacked_generate_one(stacked, sampler, prompts: Prompts, keys):
  """E experts' rollouts [E, B, G, R] of their prompts [E, B, P], keys [E] (the body of
  sampling.stacked_generate)."""
  # Only the per-expert compute is vmapped. The loop stays outside, so its predicate is one
  # scalar (a vmapped while_loop with per-expert predicates selects -- copies -- the whole
  # carry every step), and so do the buffer writes. decode_step writes the new keys into
  # the cache itself, as a dynamic_update_slice even under this vmap
  # (decoder.write_slots), before attention reads them: one in-place write per step.
  if not lora.is_lora(stacked) and jax.tree.leaves(stacked)[0].shape[0] == 1:
    # One expert: the single-policy loop, without a vmap of size 1 (through its squeezed
    # axis XLA:CPU duplicates the cache writes of decode_step and copies every cache
    # twice a step).
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
    one = _generate_one(first(stacked), sampler, first(prompts), keys[0])
    return jax.tree.map(lambda x: x[None], one)
  stacked = sampler.policy.cast(stacked)
  params_axes = lora.branch_axes(stacked)  # LoRA branches: the shared base is not mapped
  state = jax.vmap(lambda prm, pr, key: _start(prm, sampler, pr, key),
                   in_axes=(params_axes, 0, 0))(stacked, prompts, keys)

  def advance(step, st):
    new_kv, draw = jax.vmap(lambda prm, s, key: _next_draw(prm, sampler, s, key, step),
                            in_axes=(params_axes, 0, 0))(stacked, st, keys)
    return _store(st, new_kv, draw, step)
  bufs = _decode_loop(advance, state, sampler.config.max_new_tokens)
  return jax.vmap(lambda bf: _to_rollout(bf, prompts.tokens.shape[1], sampler.num_samples))(bufs)


def _generate_by_recompute_one(params, sampler, prompts: Prompts, key, row_media=None):
  """The cache-free oracle: a full forward over [N, P+R] for every new token.
  row_media: the media repeated for every sample row (Policy.sample_rows_media)."""
  policy, sampling = sampler.policy, sampler.config
  prompt_tokens, vision = prompts.tokens, prompts.media
  b, p = prompt_tokens.shape
  g, r = sampler.num_samples, sampling.max_new_tokens
  n = b * g
  head = policy.lm_head(params)
  prompt_mask = jnp.repeat(prompts.mask.astype(bool), g, axis=0)
  sequence = jnp.concatenate([jnp.repeat(prompt_tokens, g, axis=0),
                              jnp.zeros((n, r), prompt_tokens.dtype)], axis=1)

  def step_fn(state):
    step, sequence, bufs = state  # draw token `step` from the hidden at column P+step-1
    generated = jnp.broadcast_to(jnp.arange(r)[None, :] < step, (n, r))
    token_mask = jnp.concatenate([prompt_mask, generated], axis=1)
    hidden = policy.recompute_hidden(params, sequence, token_mask, row_media, vision, r)
    last = jax.lax.dynamic_index_in_dim(hidden, p + step - 1, axis=1, keepdims=False)
    bufs = _sample_and_record(bufs, decoder.logits_from_hidden(last, head), key, step,
                              sampling)
    sequence = jax.lax.dynamic_update_slice_in_dim(
        sequence, jax.lax.dynamic_index_in_dim(bufs.tokens, step, axis=1), p + step, axis=1)
    return step + 1, sequence, bufs

  _, _, bufs = jax.lax.while_loop(lambda s: _keep_decoding(s[0], s[2], r), step_fn,
                                  (jnp.int32(0), sequence, _empty_buffers(n, r)))
  return _to_rollout(bufs, b, g)


# The sampler (sampling.api.Sampler: policy, settings, G) is static: hashable, so equal
# samplers share one compile.
_generate_jit = jax.jit(_generate_one, static_argnums=1)
_generate_by_recompute_jit = jax.jit(_generate_by_recompute_one, static_argnums=1)
