"""Jitted autoregressive sampling with a KV cache, for one policy or vmapped over experts.

    rollout = generate(params, cfg, prompt_tokens, prompt_mask, vision, key, sampling, G)

1. Prefill: the B left-padded prompts (and their vision clips) go through the model ONCE.
   Their per-layer keys/values become the shared prefix of the cache: stored once per
   prompt and read once per prompt by all G samples (model.LayerCache), never repeated G
   times. Each of the N = B*G rows gets its own R response slots.
2. Decode: a compiled `lax.while_loop` feeds one token per step into the fixed-size cache
   (P prefix + R response slots) and stops early once every row has emitted a stop token.

Randomness: token r of every row is drawn with `fold_in(key, r)`, so a rollout is a pure
function of its key. `generate_by_recompute` follows the same key schedule without a cache
(full forward each step): it is the oracle for tests and the baseline for benchmarks.

Log-probs. Each sampled token carries two numbers, both over the FULL vocabulary (no
top-k / top-p truncation), because the trainer scores tokens under the untruncated policy:
  logprobs     = log_softmax(logits / temperature)[token]
  raw_logprobs = log_softmax(logits)[token]          (temperature 1: what the trainer
                                                      recomputes with forward_hidden)
Tokens after a row's first stop token are pad (PAD_ID) with mask 0 and log-probs 0.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from copd_jax.models import decoder, model_config, qwen3_vl, qwen3_vl_decode
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig
from copd_jax.sharding import MeshProgram, RunSharding, constrain

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to draw responses. top_k=0 and top_p=1.0 switch truncation off.

  greedy=True takes the argmax of the raw logits; top-k/top-p are then unused and the
  temperature only scales the reported `logprobs`.
  """
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token_ids: tuple[int, ...] = ()
  greedy: bool = False
  # Never sampled (e.g. <pad>, <bos>, <img>: a generated placeholder would be embedded
  # differently by the sampler and by a teacher-forced re-scoring).
  banned_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    # Lists (e.g. from a config file) become tuples so the config stays hashable for jit.
    ids = self.stop_token_ids
    if isinstance(ids, (int, np.integer)):
      ids = (ids,)
    try:
      ids = tuple(ids)
    except TypeError:
      raise ValueError(f"SamplingConfig.stop_token_ids must be a sequence of token ids, "
                       f"got {self.stop_token_ids!r}") from None
    object.__setattr__(self, "stop_token_ids", ids)
    object.__setattr__(self, "banned_token_ids", tuple(self.banned_token_ids))
    self.validate()
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))

  def validate(self) -> None:
    def is_int(v):
      return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
      raise ValueError(f"SamplingConfig.max_new_tokens must be a positive integer, got "
                       f"{self.max_new_tokens!r}")
    def is_real(v):
      return isinstance(v, numbers.Real) and not isinstance(v, bool)
    if not is_real(self.temperature) or not self.temperature > 0:
      raise ValueError(f"SamplingConfig.temperature must be positive, got {self.temperature!r}")
    if not is_int(self.top_k) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be a non-negative integer (0 = off), got "
                       f"{self.top_k!r}")
    if not is_real(self.top_p) or not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")
    if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
      raise ValueError(f"SamplingConfig.stop_token_ids must be non-negative token ids, got "
                       f"{self.stop_token_ids!r}")
    if not all(is_int(t) and t >= 0 for t in self.banned_token_ids):
      raise ValueError(f"SamplingConfig.banned_token_ids must be non-negative token ids, got "
                       f"{self.banned_token_ids!r}")
    if set(self.banned_token_ids) & set(self.stop_token_ids):
      raise ValueError("SamplingConfig.banned_token_ids must not contain a stop token")
    if not isinstance(self.greedy, (bool, np.bool_)):
      raise ValueError(f"SamplingConfig.greedy must be a bool, got {self.greedy!r}")


@flax.struct.dataclass
class Rollout:
  """G sampled responses for each of B prompts (a leading E axis when stacked).

  tokens:       int32[B, G, R]  sampled tokens, PAD_ID after the first stop token
  logprobs:     f32[B, G, R]    log_softmax(logits / temperature) at the token, untruncated
  raw_logprobs: f32[B, G, R]    log_softmax(logits) at the token (temperature 1, untruncated)
  mask:         f32[B, G, R]    1 up to and including the first stop token, 0 after
  lengths:      int32[B, G]     number of response tokens (= mask.sum(-1))
  finished:     bool[B, G]      True when the response ended with a stop token
  """
  tokens: jax.Array
  logprobs: jax.Array
  raw_logprobs: jax.Array
  mask: jax.Array
  lengths: jax.Array
  finished: jax.Array


# --------------------------------------------------------------------------- one step


def process_logits(logits, sampling: SamplingConfig):
  """The distribution actually sampled from: logits/temperature, then top-k, then top-p.

  logits: f32[N, V] -> f32[N, V] with excluded tokens at -inf.
  """
  scaled = logits.astype(jnp.float32) / sampling.temperature
  if 0 < sampling.top_k < scaled.shape[-1]:
    kth_largest = jax.lax.top_k(scaled, sampling.top_k)[0][..., -1:]
    scaled = jnp.where(scaled >= kth_largest, scaled, -jnp.inf)
  if sampling.top_p < 1.0:
    descending = jnp.sort(scaled, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
    keep = mass_before < sampling.top_p
    threshold = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  return scaled


def sample_tokens(logits, key, sampling: SamplingConfig):
  """Draws one token per row. logits: f32[N, V] ->
  (tokens int32[N], logprobs f32[N] at temperature, raw_logprobs f32[N] at temperature 1)."""
  logits = logits.astype(jnp.float32)
  choice = logits
  if sampling.banned_token_ids:
    choice = logits.at[:, jnp.array(sampling.banned_token_ids)].set(-jnp.inf)
  if sampling.greedy:
    tokens = jnp.argmax(choice, axis=-1)
  else:
    tokens = jax.random.categorical(key, process_logits(choice, sampling), axis=-1)
  tokens = tokens.astype(jnp.int32)

  def log_prob_at(lg):
    return jnp.take_along_axis(jax.nn.log_softmax(lg, axis=-1), tokens[:, None], axis=-1)[:, 0]
  return tokens, log_prob_at(logits / sampling.temperature), log_prob_at(logits)


@flax.struct.dataclass
class _Buffers:
  """Per-row outputs under construction: [N, R] each, plus done: bool[N]."""
  tokens: jax.Array
  logprobs: jax.Array
  raw_logprobs: jax.Array
  mask: jax.Array
  done: jax.Array


def _empty_buffers(n: int, r: int) -> _Buffers:
  zeros = jnp.zeros((n, r), jnp.float32)
  return _Buffers(jnp.zeros((n, r), jnp.int32), zeros, zeros, zeros, jnp.zeros((n,), bool))


@flax.struct.dataclass
class _Draw:
  """One step's outcome per row, each [N]: the token (pad for finished rows), its log-probs,
  whether the row was still live, and whether it is done after this token."""
  tokens: jax.Array
  logprobs: jax.Array
  raw_logprobs: jax.Array
  live: jax.Array
  done: jax.Array


def _draw(logits, key, step, done, sampling: SamplingConfig) -> _Draw:
  """Draws token `step` for every row from logits f32[N, V]; rows already done get pad."""
  tokens, logprobs, raw = sample_tokens(logits, jax.random.fold_in(key, step), sampling)
  live = ~done
  tokens = jnp.where(live, tokens, PAD_ID)
  stop_ids = jnp.asarray(sampling.stop_token_ids, jnp.int32).reshape(-1)
  is_stop = jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1) & live
  return _Draw(tokens=tokens, logprobs=jnp.where(live, logprobs, 0.0),
               raw_logprobs=jnp.where(live, raw, 0.0), live=live, done=done | is_stop)


def _record(bufs: _Buffers, draw: _Draw, step) -> _Buffers:
  """Writes a draw into column `step`. Any leading axes (an expert axis) work, so stacked
  sampling keeps this in-place update outside its vmap."""
  def put(buf, column):
    return jax.lax.dynamic_update_index_in_dim(buf, column.astype(buf.dtype), step, axis=-1)
  return _Buffers(tokens=put(bufs.tokens, draw.tokens), logprobs=put(bufs.logprobs, draw.logprobs),
                  raw_logprobs=put(bufs.raw_logprobs, draw.raw_logprobs),
                  mask=put(bufs.mask, draw.live), done=draw.done)


def _sample_and_record(bufs: _Buffers, logits, key, step, sampling: SamplingConfig) -> _Buffers:
  return _record(bufs, _draw(logits, key, step, bufs.done, sampling), step)


def _to_rollout(bufs: _Buffers, b: int, g: int) -> Rollout:
  r = bufs.tokens.shape[1]
  lengths = bufs.mask.sum(-1).astype(jnp.int32)
  return Rollout(tokens=bufs.tokens.reshape(b, g, r), logprobs=bufs.logprobs.reshape(b, g, r),
                 raw_logprobs=bufs.raw_logprobs.reshape(b, g, r), mask=bufs.mask.reshape(b, g, r),
                 lengths=lengths.reshape(b, g), finished=bufs.done.reshape(b, g))


def _keep_decoding(step, bufs: _Buffers, max_new_tokens: int):
  """Loop predicate: tokens left to draw and some row (of any expert) still live."""
  return (step < max_new_tokens) & ~jnp.all(bufs.done)


# --------------------------------------------------------------------------- generate


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
  state = jax.vmap(lambda prm, tok, m, vis, key: _start(prm, cfg, tok, m, vis, key, sampling,
                                                        num_samples))(
      stacked, prompt_tokens, prompt_mask, vision, keys)

  def advance(step, st):
    new_kv, draw = jax.vmap(
        lambda prm, s, prev, key: _next_draw(prm, cfg, s, prev, key, sampling, step))(
            stacked, st, _previous_tokens(st, step), keys)
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


def _check_generate_args(cfg, prompt_tokens, prompt_mask, vision, sampling, num_samples,
                         lead: tuple[int, ...] = ()):
  """Clear errors before tracing. `lead` = expected leading (expert) dims of every input."""
  if not isinstance(cfg, (model_config.ModelConfig, Qwen3VLConfig)):
    raise ValueError(f"cfg must be a ModelConfig or Qwen3VLConfig, got {type(cfg).__name__}")
  vocab_size = cfg.text.vocab_size if isinstance(cfg, Qwen3VLConfig) else cfg.vocab_size
  if not isinstance(sampling, SamplingConfig):
    raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or \
      num_samples <= 0:
    raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
  for name in ("stop_token_ids", "banned_token_ids"):
    bad = [t for t in getattr(sampling, name) if t >= vocab_size]
    if bad:
      raise ValueError(f"sampling.{name} {bad} are not below vocab_size={vocab_size}")
  nd = len(lead) + 2
  shape = tuple(prompt_tokens.shape)
  if len(shape) != nd or shape[:len(lead)] != lead:
    want = "[E, B, P]" if lead else "[B, P]"
    raise ValueError(f"prompt_tokens must be int{want}, got shape {shape}")
  if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
    raise ValueError(f"prompt_tokens must be an integer array, got dtype {prompt_tokens.dtype}")
  if tuple(prompt_mask.shape) != shape:
    raise ValueError(f"prompt_mask must have the shape of prompt_tokens {shape}, got "
                     f"{tuple(prompt_mask.shape)}")
  if isinstance(cfg, Qwen3VLConfig):
    if isinstance(vision, qwen3_vl_decode.PromptMedia):  # per prompt, a vision budget
      want = shape[:-1] + (3, shape[-1])
      where = f"int[{'E, ' if lead else ''}B, 3, P]"
    elif isinstance(vision, qwen3_vl_decode.VisionInputs):  # the batch's media at once
      want = (3,) + shape
      where = f"int[3, {'E, ' if lead else ''}B, P]"
    else:
      raise ValueError("a Qwen3-VL prompt batch needs vision=qwen3_vl_decode.VisionInputs "
                       "(vision_inputs(...)) or qwen3_vl_decode.PromptMedia (prompt_media"
                       f"(...)), got {type(vision).__name__}")
    if tuple(vision.position_ids.shape) != want:
      raise ValueError(f"vision.position_ids must be {where} = {want}, got "
                       f"{tuple(vision.position_ids.shape)}")
    media = {cfg.image_token_id, cfg.video_token_id}
    if not media <= set(sampling.banned_token_ids):
      raise ValueError(f"sampling.banned_token_ids must hold the image / video pad tokens "
                       f"{sorted(media)}: a generated pad token has no media to replace it")
  elif vision is not None:
    if cfg.vision is None:
      raise ValueError("vision was given but ModelConfig.vision is None (a text-only model)")
    v = cfg.vision
    want = shape[:-1] + (v.num_frames, v.image_size, v.image_size, v.channels)
    if tuple(vision.shape) != want:
      raise ValueError(f"vision must be f32[{'E, ' if lead else ''}B, num_frames, H, W, C] = "
                       f"{want}, got {tuple(vision.shape)}")
  if not isinstance(prompt_mask, jax.core.Tracer):
    # Concrete masks are cheap to check: prompts must be LEFT-padded and non-empty.
    mask = np.asarray(prompt_mask).astype(bool).reshape(-1, shape[-1])
    if np.any(mask[:, 1:] < mask[:, :-1]):
      raise ValueError("prompt_mask must be left-padded (padding before the prompt, so every "
                       "prompt ends in the last column)")
    if not np.all(mask[:, -1]):
      raise ValueError("prompt_mask has an empty prompt (a row with no tokens)")


def generate(params, cfg: model_config.ModelConfig, prompt_tokens, prompt_mask, vision, key,
             sampling: SamplingConfig, num_samples: int) -> Rollout:
  """Samples `num_samples` responses per prompt with a KV cache (jitted; cfg, sampling and
  num_samples are static).

  prompt_tokens: int32[B, P] LEFT-padded; prompt_mask: bool[B, P];
  vision: f32[B, F, H, W, C] or None (the toy model), or for a Qwen3-VL cfg the batch's
  qwen3_vl_decode.VisionInputs or PromptMedia (the vision tower runs once per prompt);
  key: a PRNG key.
  Returns a Rollout with [B, G, R] fields (G = num_samples, R = sampling.max_new_tokens).
  """
  _check_generate_args(cfg, prompt_tokens, prompt_mask, vision, sampling, num_samples)
  return _generate_jit(params, cfg, prompt_tokens, prompt_mask, vision, key, sampling,
                       num_samples)


def generate_by_recompute(params, cfg: model_config.ModelConfig, prompt_tokens, prompt_mask,
                          vision, key, sampling: SamplingConfig, num_samples: int) -> Rollout:
  """Same contract and key schedule as `generate`, but recomputes the whole sequence for
  every token (no cache, prompt computed per sample). An oracle and a baseline; slow."""
  _check_generate_args(cfg, prompt_tokens, prompt_mask, vision, sampling, num_samples)
  row_vision = None
  if isinstance(vision, qwen3_vl_decode.PromptMedia):
    raise ValueError("generate_by_recompute takes VisionInputs (the batch's media), not "
                     "PromptMedia")
  if isinstance(cfg, Qwen3VLConfig):  # every sample row runs its prompt's media whole
    row_vision = qwen3_vl_decode.repeat_samples(cfg, vision, prompt_tokens, num_samples)
  return _generate_by_recompute_jit(params, cfg, prompt_tokens, prompt_mask, vision, key,
                                    sampling, num_samples, row_vision)


def stacked_generate(run: RunSharding, stacked, cfg: model_config.ModelConfig, prompt_tokens,
                     prompt_mask, vision, keys, sampling: SamplingConfig,
                     num_samples: int) -> Rollout:
  """`generate` for E experts in one vmapped call on run's mesh, each on its own prompts
  and key: the sampler of training, evaluation and diagnostics alike (one device is a
  mesh of size 1).

  stacked: params with leading expert axis E; prompt_tokens: int32[E, B, P];
  prompt_mask: bool[E, B, P]; vision: f32[E, B, F, H, W, C] or None (or Qwen3-VL's
  PromptMedia / VisionInputs with leading [E, B]); keys: PRNG keys [E] (or their uint32
  key data [E, 2]); every process passes the same host prompts and keys.
  Returns a Rollout with [E, B, G, R] fields, global arrays sharded expert x batch. The
  loop runs until every expert is done.
  """
  keys = jnp.asarray(keys)
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.key_data(keys)
  check_stacked_generate_args(stacked, cfg, prompt_tokens, prompt_mask, vision, keys, sampling,
                              num_samples)
  return sampler_program(run, cfg, sampling, num_samples)(
      stacked, prompt_tokens, prompt_mask, vision, np.asarray(keys))


def check_stacked_generate_args(stacked, cfg, prompt_tokens, prompt_mask, vision, keys,
                                sampling: SamplingConfig, num_samples: int) -> None:
  """The checks of `stacked_generate`, before anything is traced. keys: [E] PRNG keys or
  their uint32 key data."""
  e = int(jax.tree_util.tree_leaves(stacked)[0].shape[0])
  _check_generate_args(cfg, prompt_tokens, prompt_mask, vision, sampling, num_samples, (e,))
  if jnp.shape(keys)[:1] != (e,):
    raise ValueError(f"keys must hold one PRNG key per expert ({e}), got shape "
                     f"{jnp.shape(keys)}")


def _stacked_generate_on_mesh(stacked, prompt_tokens, prompt_mask, vision, key_data, *,
                              run: RunSharding, cfg, sampling: SamplingConfig, num_samples: int):
  rollout = _stacked_generate_one(stacked, cfg, prompt_tokens, prompt_mask, vision,
                                  jax.random.wrap_key_data(key_data), sampling, num_samples)
  return constrain(rollout, jax.tree.map(lambda x: run.per_branch(x.shape, 1), rollout))


_stacked_generate_jit = jax.jit(_stacked_generate_on_mesh,
                                static_argnames=("run",) + _STATIC)


def sampler_program(run: RunSharding, cfg, sampling: SamplingConfig,
                    num_samples: int) -> MeshProgram:
  """`stacked_generate` as a program on run's mesh, without the argument checks:
  program(stacked, prompt_tokens, prompt_mask, vision, key_data uint32[E, 2]) runs it,
  program.lower(...) lowers it (arguments may be sharded jax.ShapeDtypeStruct).
  Parameters shard as the model's layers declare them, prompts and keys expert x batch."""
  def in_shardings(args):
    params, tokens, mask, vision, key_data = args
    return (run.stacked_params(params), run.per_branch(tokens.shape, 1),
            run.per_branch(mask.shape, 1),
            jax.tree.map(lambda x: run.per_branch(x.shape, 1), vision),
            run.per_branch(key_data.shape))
  return MeshProgram(_stacked_generate_jit, run.mesh, in_shardings,
                     dict(run=run, cfg=cfg, sampling=sampling, num_samples=num_samples))
