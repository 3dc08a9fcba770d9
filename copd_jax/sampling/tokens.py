"""How one token is drawn: the sampling settings (SamplingConfig), a rollout's fields
(Rollout), logit processing, and the per-row output buffers the decode loop fills."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PAD_ID = 0


class Prompts(NamedTuple):
  """The sampler's prompts. tokens: int[..., B, P] LEFT-padded (every prompt ends in the
  last column); mask: bool[..., B, P]; media: the toy model's frames f32[..., B, F, H, W,
  C], Qwen3-VL's PromptMedia or VisionInputs with the same leading axes, or None (a
  text-only model). The leading axes are () for one policy, [E] for stacked experts."""
  tokens: Any
  mask: Any
  media: Any = None


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
