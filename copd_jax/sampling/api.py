"""The sampler's entry points: what to sample, bound once (Sampler: the policy, the
settings, G), argument checks, then one policy (generate, and its cache-free oracle
generate_by_recompute) or stacked experts on a run's mesh (stacked_generate, the sampler
of training, evaluation and diagnostics; sampler_program)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax.models import stacked as stacked_lib
from copd_jax.models.policy import policy_of
from copd_jax.sampling.decode import (
  _generate_by_recompute_jit,
  _generate_jit,
  _stacked_generate_one,
)
from copd_jax.sampling.tokens import Prompts, Rollout, SamplingConfig
from copd_jax.sharding import MeshProgram, RunSharding


@dataclasses.dataclass(frozen=True)
class Sampler:
  """What to sample, bound once when a step (or an evaluation) is built: the policy, the
  decoding settings and G = num_samples responses per prompt. A call passes only what
  changes: the params, the prompts and the key (generate, stacked_generate).

  policy: a models.policy Policy, or a model config (models.policy.policy_of turns it
  into its Policy here). Hashable: the static argument of the jitted samplers, so equal
  samplers share one compile. Checked when built (clear errors before anything is
  traced)."""
  policy: Any
  config: SamplingConfig
  num_samples: int

  def __post_init__(self):
    object.__setattr__(self, "policy", policy_of(self.policy))
    if not isinstance(self.config, SamplingConfig):
      raise ValueError(f"sampling must be a SamplingConfig, got {type(self.config).__name__}")
    g = self.num_samples
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g <= 0:
      raise ValueError(f"num_samples must be a positive integer, got {g!r}")
    vocab_size = self.policy.text.vocab_size
    for name in ("stop_token_ids", "banned_token_ids"):
      bad = [t for t in getattr(self.config, name) if t >= vocab_size]
      if bad:
        raise ValueError(f"sampling.{name} {bad} are not below vocab_size={vocab_size}")


def _check_prompts(sampler: Sampler, prompts: Prompts, lead: tuple[int, ...] = ()):
  """Clear errors before tracing. `lead` = expected leading (expert) dims of every input."""
  prompt_tokens, prompt_mask = prompts.tokens, prompts.mask
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
  sampler.policy.check_sampler_media(prompts.media, shape, lead, sampler.config)
  if not isinstance(prompt_mask, jax.core.Tracer):
    # Concrete masks are cheap to check: prompts must be LEFT-padded and non-empty.
    mask = np.asarray(prompt_mask).astype(bool).reshape(-1, shape[-1])
    if np.any(mask[:, 1:] < mask[:, :-1]):
      raise ValueError("prompt_mask must be left-padded (padding before the prompt, so every "
                       "prompt ends in the last column)")
    if not np.all(mask[:, -1]):
      raise ValueError("prompt_mask has an empty prompt (a row with no tokens)")


def generate(params, sampler: Sampler, prompts: Prompts, key) -> Rollout:
  """Samples sampler.num_samples responses per prompt with a KV cache (jitted; the
  sampler is static).

  prompts: Prompts [B, P] (tokens LEFT-padded; media: f32[B, F, H, W, C] or None for the
  toy model, or for Qwen3-VL the batch's qwen3_vl_decode.VisionInputs or PromptMedia: the
  vision tower runs once per prompt); key: a PRNG key.
  Returns a Rollout with [B, G, R] fields (G = num_samples, R = config.max_new_tokens).
  """
  _check_prompts(sampler, prompts)
  return _generate_jit(params, sampler, prompts, key)


def generate_by_recompute(params, sampler: Sampler, prompts: Prompts, key) -> Rollout:
  """Same contract and key schedule as `generate`, but recomputes the whole sequence for
  every token (no cache, prompt computed per sample). An oracle and a baseline; slow."""
  _check_prompts(sampler, prompts)
  row_media = sampler.policy.sample_rows_media(prompts.media, prompts.tokens,
                                               sampler.num_samples)
  return _generate_by_recompute_jit(params, sampler, prompts, key, row_media)


def stacked_generate(run: RunSharding, stacked, sampler: Sampler, prompts: Prompts,
                     keys) -> Rollout:
  """`generate` for E experts in one vmapped call on run's mesh, each on its own prompts
  and key: the sampler of training, evaluation and diagnostics alike (one device is a
  mesh of size 1).

  stacked: params with leading expert axis E; prompts: Prompts [E, B, P] (media with
  leading [E, B], or None); keys: PRNG keys [E] (or their uint32 key data [E, 2]); every
  process passes the same host prompts and keys.
  Returns a Rollout with [E, B, G, R] fields, global arrays sharded expert x batch. The
  loop runs until every expert is done.
  """
  keys = jnp.asarray(keys)
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.key_data(keys)
  check_stacked_generate_args(stacked, sampler, prompts, keys)
  return sampler_program(run, sampler)(stacked, prompts, np.asarray(keys))


def check_stacked_generate_args(stacked, sampler: Sampler, prompts: Prompts, keys) -> None:
  """The checks of `stacked_generate`, before anything is traced. keys: [E] PRNG keys or
  their uint32 key data."""
  e = stacked_lib.num_experts(stacked)
  _check_prompts(sampler, prompts, (e,))
  if jnp.shape(keys)[:1] != (e,):
    raise ValueError(f"keys must hold one PRNG key per expert ({e}), got shape "
                     f"{jnp.shape(keys)}")


def _stacked_generate_on_mesh(sampler: Sampler, stacked, prompts: Prompts, key_data):
  return _stacked_generate_one(stacked, sampler, prompts, jax.random.wrap_key_data(key_data))


def sampler_program(run: RunSharding, sampler: Sampler) -> MeshProgram:
  """`stacked_generate` as a program on run's mesh, without the argument checks:
  program(stacked, prompts, key_data uint32[E, 2]) runs it, program.lower(...) lowers it
  (arguments may be jax.ShapeDtypeStruct). Parameters shard as the model's layers
  declare them; prompts, keys and the rollout expert x batch."""
  def shardings(args):
    params, prompts, key_data = args
    tokens = prompts.tokens
    rollout = run.per_branch(tuple(tokens.shape[:2]) + (sampler.num_samples, 1), 1)  # [E, B, G, .]
    prompt_sh = Prompts(run.per_branch(tokens.shape, 1), run.per_branch(prompts.mask.shape, 1),
                        jax.tree.map(lambda x: run.per_branch(x.shape, 1), prompts.media))
    return ((run.stacked_params(params), prompt_sh, run.per_branch(key_data.shape)), rollout)
  return MeshProgram(_stacked_generate_on_mesh, (sampler,), run.mesh, shardings)
