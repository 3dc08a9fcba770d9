"""The sampler's entry points: argument checks, then one policy (generate, and its cache-free
oracle generate_by_recompute) or stacked experts on a run's mesh (stacked_generate, the
sampler of training, evaluation and diagnostics; sampler_program)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax.models import model_config, qwen3_vl_decode, stacked as stacked_lib
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig
from copd_jax.sampling.decode import (
  _generate_by_recompute_jit,
  _generate_jit,
  _stacked_generate_one,
)
from copd_jax.sampling.tokens import Rollout, SamplingConfig
from copd_jax.sharding import MeshProgram, RunSharding


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
  e = stacked_lib.num_experts(stacked)
  _check_generate_args(cfg, prompt_tokens, prompt_mask, vision, sampling, num_samples, (e,))
  if jnp.shape(keys)[:1] != (e,):
    raise ValueError(f"keys must hold one PRNG key per expert ({e}), got shape "
                     f"{jnp.shape(keys)}")


def _stacked_generate_on_mesh(cfg, sampling: SamplingConfig, num_samples: int, stacked,
                              prompt_tokens, prompt_mask, vision, key_data):
  return _stacked_generate_one(stacked, cfg, prompt_tokens, prompt_mask, vision,
                               jax.random.wrap_key_data(key_data), sampling, num_samples)


def sampler_program(run: RunSharding, cfg, sampling: SamplingConfig,
                    num_samples: int) -> MeshProgram:
  """`stacked_generate` as a program on run's mesh, without the argument checks:
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
  return MeshProgram(_stacked_generate_on_mesh, (cfg, sampling, num_samples), run.mesh,
                     shardings)
