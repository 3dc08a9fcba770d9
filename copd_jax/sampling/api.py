"""The sampler's entry points: argument checks, then one policy (generate, and its cache-free
oracle generate_by_recompute) or stacked experts on a run's mesh (stacked_generate, the
sampler of training, evaluation and diagnostics; sampler_program)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax.models import stacked as stacked_lib
from copd_jax.models.policy import Policy, policy_of
from copd_jax.sampling.decode import (
  _generate_by_recompute_jit,
  _generate_jit,
  _stacked_generate_one,
)
from copd_jax.sampling.tokens import Rollout, SamplingConfig
from copd_jax.sharding import MeshProgram, RunSharding


def _check_generate_args(policy: Policy, prompt_tokens, prompt_mask, vision, sampling,
                         num_samples, lead: tuple[int, ...] = ()):
  """Clear errors before tracing. `lead` = expected leading (expert) dims of every input."""
  vocab_size = policy.text.vocab_size
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
  policy.check_sampler_media(vision, shape, lead, sampling)
  if not isinstance(prompt_mask, jax.core.Tracer):
    # Concrete masks are cheap to check: prompts must be LEFT-padded and non-empty.
    mask = np.asarray(prompt_mask).astype(bool).reshape(-1, shape[-1])
    if np.any(mask[:, 1:] < mask[:, :-1]):
      raise ValueError("prompt_mask must be left-padded (padding before the prompt, so every "
                       "prompt ends in the last column)")
    if not np.all(mask[:, -1]):
      raise ValueError("prompt_mask has an empty prompt (a row with no tokens)")


def generate(params, cfg, prompt_tokens, prompt_mask, vision, key, sampling: SamplingConfig,
             num_samples: int) -> Rollout:
  """Samples `num_samples` responses per prompt with a KV cache (jitted; the policy,
  sampling and num_samples are static).

  cfg: a models.policy Policy, or a model config (models.policy.policy_of).
  prompt_tokens: int32[B, P] LEFT-padded; prompt_mask: bool[B, P];
  vision: f32[B, F, H, W, C] or None (the toy model), or for a Qwen3-VL cfg the batch's
  qwen3_vl_decode.VisionInputs or PromptMedia (the vision tower runs once per prompt);
  key: a PRNG key.
  Returns a Rollout with [B, G, R] fields (G = num_samples, R = sampling.max_new_tokens).
  """
  policy = policy_of(cfg)
  _check_generate_args(policy, prompt_tokens, prompt_mask, vision, sampling, num_samples)
  return _generate_jit(params, policy, prompt_tokens, prompt_mask, vision, key, sampling,
                       num_samples)


def generate_by_recompute(params, cfg, prompt_tokens, prompt_mask, vision, key,
                          sampling: SamplingConfig, num_samples: int) -> Rollout:
  """Same contract and key schedule as `generate`, but recomputes the whole sequence for
  every token (no cache, prompt computed per sample). An oracle and a baseline; slow."""
  policy = policy_of(cfg)
  _check_generate_args(policy, prompt_tokens, prompt_mask, vision, sampling, num_samples)
  row_vision = policy.sample_rows_media(vision, prompt_tokens, num_samples)
  return _generate_by_recompute_jit(params, policy, prompt_tokens, prompt_mask, vision, key,
                                    sampling, num_samples, row_vision)


def stacked_generate(run: RunSharding, stacked, cfg, prompt_tokens, prompt_mask, vision, keys,
                     sampling: SamplingConfig, num_samples: int) -> Rollout:
  """`generate` for E experts in one vmapped call on run's mesh, each on its own prompts
  and key: the sampler of training, evaluation and diagnostics alike (one device is a
  mesh of size 1).

  cfg: a models.policy Policy or a model config (policy_of);
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
  policy = policy_of(cfg)
  check_stacked_generate_args(stacked, policy, prompt_tokens, prompt_mask, vision, keys,
                              sampling, num_samples)
  return sampler_program(run, policy, sampling, num_samples)(
      stacked, prompt_tokens, prompt_mask, vision, np.asarray(keys))


def check_stacked_generate_args(stacked, cfg, prompt_tokens, prompt_mask, vision, keys,
                                sampling: SamplingConfig, num_samples: int) -> None:
  """The checks of `stacked_generate`, before anything is traced. keys: [E] PRNG keys or
  their uint32 key data."""
  e = stacked_lib.num_experts(stacked)
  _check_generate_args(policy_of(cfg), prompt_tokens, prompt_mask, vision, sampling,
                       num_samples, (e,))
  if jnp.shape(keys)[:1] != (e,):
    raise ValueError(f"keys must hold one PRNG key per expert ({e}), got shape "
                     f"{jnp.shape(keys)}")


def _stacked_generate_on_mesh(policy: Policy, sampling: SamplingConfig, num_samples: int,
                              stacked, prompt_tokens, prompt_mask, vision, key_data):
  return _stacked_generate_one(stacked, policy, prompt_tokens, prompt_mask, vision,
                               jax.random.wrap_key_data(key_data), sampling, num_samples)


def sampler_program(run: RunSharding, cfg, sampling: SamplingConfig,
                    num_samples: int) -> MeshProgram:
  """`stacked_generate` as a program on run's mesh (cfg: a Policy or a model config),
  without the argument checks:
  program(stacked, prompt_tokens, prompt_mask, vision, key_data uint32[E, 2]) runs it,
  program.lower(...) lowers it (arguments may be jax.ShapeDtypeStruct). Parameters
  shard as the model's layers declare them; prompts, keys and the rollout expert x batch."""
  def shardings(args):
    params, tokens, mask, vision, key_data = args
    rollout = run.per_branch(tuple(tokens.shape[:2]) + (num_samples, 1), 1)  # [E, B, G, .]
    return ((run.stacked_params(params), run.per_branch(tokens.shape, 1),
             run.per_branch(mask.shape, 1),
             jax.tree.map(lambda x: run.per_branch(x.shape, 1), vision),
             run.per_branch(key_data.shape)), rollout)
  return MeshProgram(_stacked_generate_on_mesh, (policy_of(cfg), sampling, num_samples),
                     run.mesh, shardings)
