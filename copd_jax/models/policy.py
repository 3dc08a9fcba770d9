"""The one contract every policy model meets (Policy), for the sampler and the scorers.

A policy object is a static, hashable description -- the model config, and the residual
stream's sharding constraint if any -- with methods; parameters always travel separately
(a plain pytree, or lora.LoraBranches). So a policy is a static argument of jax.jit, it
goes under jax.vmap over the expert axis unchanged (only the parameters are mapped), and
two equal configs give equal policies: nothing compiles twice for it.

    policy = policy_of(model_cfg)          # TextPolicy or Qwen3VLPolicy
    hidden, prefix_kv = policy.prefill(params, prompt_tokens, prompt_mask, media)
    hidden, new_kv = policy.decode_step(params, tokens, positions, prefix_mask, cache, i)
    logits = decoder.logits_from_hidden(hidden, policy.lm_head(params))

Two implementations: TextPolicy (the text decoder: the toy model with its tubelet vision
tower, or Qwen3; LoRA branches included, see lora.variables) and Qwen3VLPolicy. Media
("media" / "frames"): the toy's frames f32[B, F, H, W, C] or None; for Qwen3-VL a
qwen3_vl_decode.VisionInputs (the batch's media at once) or PromptMedia (per prompt).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from copd_jax.models import decoder, qwen3_vl, qwen3_vl_decode
from copd_jax.models.model_config import ModelConfig
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig

Params = Any


class Policy(Protocol):
  """What the sampler (copd_jax.sampling) and the scorers (rl.scoring) call.

  cfg: the model config; text: the text decoder's ModelConfig (vocab_size, dtypes);
  needs_prompt_len: True when rows can be scored only with their prompt length known
    (the media belong to the prompt, which runs once for its samples).
  """
  cfg: Any
  constrain: Callable | None

  @property
  def text(self) -> ModelConfig: ...

  @property
  def needs_prompt_len(self) -> bool: ...

  def with_constraint(self, constrain: Callable | None) -> "Policy":
    """The same policy whose residual stream [rows, T, D] goes through constrain(x)
    after the embedding and after each layer (decoder.Decoder.constrain)."""

  def init_params(self, key) -> Params:
    """Fresh f32 parameters of one policy."""

  def param_axes(self) -> dict:
    """{parameter path: logical axes} its layers declare (nothing allocated)."""

  def cast(self, params: Params) -> Params:
    """params with the matmul kernels in the compute dtype (decoder.cast_matmul_kernels)."""

  def lm_head(self, params: Params) -> jax.Array:
    """f32[D, V]: the output projection (the embedding transposed when tied)."""

  def prefill(self, params, tokens, mask, media):
    """Left-padded prompts int32[B, P] with mask bool[B, P] -> (hidden f32[B, P, D],
    per-layer (k, v) [B, K, P, Dh]): the shared prefix of a decode cache."""

  def first_positions(self, mask, media) -> jax.Array:
    """int32[B]: the position of each prompt's first generated token."""

  def decode_step(self, params, tokens, positions, prefix_mask, cache, write_index):
    """Generated tokens int32[N, T] at positions int32[N, T] over the prompts' cache
    (N = B*G rows, read only): (hidden f32[N, T, D], their per-layer (k, v))."""

  def rows_hidden(self, params, tokens, positions, token_mask, media):
    """Whole rows [N, T] (no shared prompt): final-normed hidden f32[N, T, D]."""

  def shared_prefix_hidden(self, params, prompt_tokens, prompt_positions, prompt_mask, media,
                           tokens, positions):
    """Teacher forcing of G continuations int32[N, R] per prompt [B, P], each prompt run
    once: (prompt hidden f32[B, P, D], continuation hidden f32[N, R, D])."""

  def sample_rows_media(self, media, prompt_tokens, num_samples: int):
    """Host side: the prompts' media repeated for their G sample rows (row b*G + j =
    prompt b), for the cache-free sampler oracle; None without media."""

  def recompute_hidden(self, params, tokens, token_mask, row_media, prompt_media,
                       num_new: int):
    """The cache-free sampler oracle's forward over [prompt | R generated] rows
    int32[N, P + R]: hidden f32[N, P + R, D]."""

  def check_sampler_media(self, media, shape: tuple, lead: tuple, sampling) -> None:
    """Clear errors for the sampler's media of prompts of shape [*lead, B, P]."""

  @property
  def media_token_ids(self) -> tuple[int, ...]:
    """Ids that stand for media only (filled from the media, never generated)."""

  def abstract_media(self, lead: tuple[int, ...], prompt_len: int, vision_budget: int):
    """jax.ShapeDtypeStruct media [*lead, ...] of prompts of prompt_len tokens (None for a
    text-only model); vision_budget: patches per prompt (Qwen3-VL's PromptMedia)."""

  def load_hf(self, directory: str):
    """(the checkpoint's model config with this policy's execution settings, its f32
    parameters, layers unrolled) of a Hugging Face checkpoint directory of this family."""

  def export_hf(self, out_dir: str, params, *, source_dir: str, tokenizer_dir: str | None,
                dtype: str, language_model_only: bool) -> None:
    """Writes one policy's params as a Hugging Face checkpoint directory of this family."""


def _same_shape_error(name: str, where: str, want, got) -> ValueError:
  return ValueError(f"{name} must be {where} = {want}, got {tuple(got)}")


@dataclasses.dataclass(frozen=True)
class TextPolicy:
  """The text decoder (decoder.Policy): Qwen3, or the toy model with its tubelet vision
  tower; parameters a plain pytree or lora.LoraBranches."""
  cfg: ModelConfig
  constrain: Callable | None = None
  needs_prompt_len = False

  @property
  def text(self) -> ModelConfig:
    return self.cfg

  def with_constraint(self, constrain):
    return dataclasses.replace(self, constrain=constrain)

  def init_params(self, key):
    return decoder.init_params(self.cfg, key)

  def param_axes(self):
    return decoder.param_axes(self.cfg)

  def cast(self, params):
    return decoder.cast_matmul_kernels(params, self.cfg)

  def lm_head(self, params):
    return decoder.lm_head(params, self.cfg)

  def prefill(self, params, tokens, mask, media):
    return decoder.prefill(params, self.cfg, tokens, decoder.positions_from_mask(mask), mask,
                           media, constrain=self.constrain)

  def first_positions(self, mask, media):
    return mask.sum(-1, dtype=jnp.int32)

  def decode_step(self, params, tokens, positions, prefix_mask, cache, write_index):
    return decoder.decode_step(params, self.cfg, tokens, positions, prefix_mask, cache,
                               write_index, constrain=self.constrain)

  def rows_hidden(self, params, tokens, positions, token_mask, media):
    return decoder.forward_hidden(params, self.cfg, tokens, positions, token_mask, media,
                                  constrain=self.constrain)

  def shared_prefix_hidden(self, params, prompt_tokens, prompt_positions, prompt_mask, media,
                           tokens, positions):
    return decoder.forward_hidden_shared_prefix(
        params, self.cfg, prompt_tokens, prompt_positions, prompt_mask, media, tokens,
        positions, constrain=self.constrain)

  def sample_rows_media(self, media, prompt_tokens, num_samples):
    return None if media is None else jnp.repeat(media, num_samples, axis=0)

  def recompute_hidden(self, params, tokens, token_mask, row_media, prompt_media, num_new):
    return decoder.forward_hidden(params, self.cfg, tokens,
                                  decoder.positions_from_mask(token_mask), token_mask,
                                  row_media, constrain=self.constrain)

  def check_sampler_media(self, media, shape, lead, sampling):
    if media is None:
      return
    if self.cfg.vision is None:
      raise ValueError("vision was given but ModelConfig.vision is None (a text-only model)")
    v = self.cfg.vision
    want = shape[:-1] + (v.num_frames, v.image_size, v.image_size, v.channels)
    if tuple(media.shape) != want:
      raise _same_shape_error("vision", f"f32[{'E, ' if lead else ''}B, num_frames, H, W, C]",
                              want, media.shape)

  media_token_ids = ()  # the toy's <img> placeholder is banned by its tokenizer's specials

  def abstract_media(self, lead, prompt_len, vision_budget):
    v = self.cfg.vision
    if v is None:
      return None
    return jax.ShapeDtypeStruct(lead + (v.num_frames, v.image_size, v.image_size, v.channels),
                                jnp.float32)

  def load_hf(self, directory):
    from copd_jax.models import hf_checkpoint, model_config
    cfg, params = hf_checkpoint.load_qwen3(directory, dtype=self.cfg.dtype)
    return model_config.with_execution_of(cfg, self.cfg), params

  def export_hf(self, out_dir, params, *, source_dir, tokenizer_dir, dtype,
                language_model_only):
    from copd_jax.models import hf_checkpoint
    if self.cfg.vision is not None and not language_model_only:
      raise ValueError("the run's model has a vision tower, which a Qwen3ForCausalLM "
                       "checkpoint cannot hold; pass --language_model_only to export the "
                       "language model without it")
    hf_checkpoint.export_qwen3(out_dir, params, self.cfg, tokenizer_dir=tokenizer_dir,
                               dtype=dtype, language_model_only=language_model_only)


@dataclasses.dataclass(frozen=True)
class Qwen3VLPolicy:
  """Qwen3-VL (models.qwen3_vl): the shared decoder with the Qwen3-VL vision tower, 3-D
  (t, h, w) prompt positions and DeepStack features; generated tokens are text."""
  cfg: Qwen3VLConfig
  constrain: Callable | None = None
  needs_prompt_len = True

  @property
  def text(self) -> ModelConfig:
    return self.cfg.text

  def with_constraint(self, constrain):
    return dataclasses.replace(self, constrain=constrain)

  def init_params(self, key):
    return qwen3_vl.init_params(self.cfg, key)

  def param_axes(self):
    return qwen3_vl.param_axes(self.cfg)

  def cast(self, params):
    return decoder.cast_matmul_kernels(params, self.cfg.text)

  def lm_head(self, params):
    return qwen3_vl.lm_head(params, self.cfg)

  def prefill(self, params, tokens, mask, media):
    return qwen3_vl_decode.prefill(params, self.cfg, tokens, mask, media, self.constrain)

  def first_positions(self, mask, media):
    return qwen3_vl_decode.first_decode_positions(mask, media)

  def decode_step(self, params, tokens, positions, prefix_mask, cache, write_index):
    return qwen3_vl_decode.decode_step(params, self.cfg, tokens, positions, prefix_mask, cache,
                                       write_index, self.constrain)

  def rows_hidden(self, params, tokens, positions, token_mask, media):
    raise ValueError("Qwen3-VL rows need their prompt length (prompt_len > 0): the media "
                     "belong to the prompt, which runs once for its samples")

  def shared_prefix_hidden(self, params, prompt_tokens, prompt_positions, prompt_mask, media,
                           tokens, positions):
    # Positions come from the media (PromptMedia.position_ids): the 1-D ones are unused.
    return qwen3_vl_decode.forward_hidden_shared_prefix(
        params, self.cfg, prompt_tokens, prompt_mask, media, tokens, self.constrain)

  def sample_rows_media(self, media, prompt_tokens, num_samples):
    if isinstance(media, qwen3_vl_decode.PromptMedia):
      raise ValueError("generate_by_recompute takes VisionInputs (the batch's media), not "
                       "PromptMedia")
    # Every sample row runs its prompt's media whole.
    return qwen3_vl_decode.repeat_samples(self.cfg, media, prompt_tokens, num_samples)

  def recompute_hidden(self, params, tokens, token_mask, row_media, prompt_media, num_new):
    # prompt_media: the B prompts' VisionInputs (positions); row_media: repeated per row.
    b = prompt_media.position_ids.shape[1]
    g = tokens.shape[0] // b
    prompt_mask = token_mask[::g, :prompt_media.position_ids.shape[2]]
    positions = qwen3_vl_decode.sequence_positions(prompt_mask, prompt_media, g, num_new)
    return qwen3_vl.forward_hidden(
        params, self.cfg, tokens, token_mask.astype(jnp.int32), positions,
        row_media.pixel_values, row_media.image_grids, row_media.pixel_values_videos,
        row_media.video_grids, constrain=self.constrain)

  def check_sampler_media(self, media, shape, lead, sampling):
    if isinstance(media, qwen3_vl_decode.PromptMedia):  # per prompt, a vision budget
      want = shape[:-1] + (3, shape[-1])
      where = f"int[{'E, ' if lead else ''}B, 3, P]"
    elif isinstance(media, qwen3_vl_decode.VisionInputs):  # the batch's media at once
      want = (3,) + shape
      where = f"int[3, {'E, ' if lead else ''}B, P]"
    else:
      raise ValueError("a Qwen3-VL prompt batch needs vision=qwen3_vl_decode.VisionInputs "
                       "(vision_inputs(...)) or qwen3_vl_decode.PromptMedia (prompt_media"
                       f"(...)), got {type(media).__name__}")
    if tuple(media.position_ids.shape) != want:
      raise _same_shape_error("vision.position_ids", where, want, media.position_ids.shape)
    pads = {self.cfg.image_token_id, self.cfg.video_token_id}
    if not pads <= set(sampling.banned_token_ids):
      raise ValueError(f"sampling.banned_token_ids must hold the image / video pad tokens "
                       f"{sorted(pads)}: a generated pad token has no media to replace it")

  @property
  def media_token_ids(self):
    return (self.cfg.image_token_id, self.cfg.video_token_id)

  def abstract_media(self, lead, prompt_len, vision_budget):
    n, unit = int(vision_budget), self.cfg.vision.merge_unit
    if n <= 0 or n % unit:
      raise ValueError(f"config.data.vision_budget={n}: a deviceless compile needs a fixed "
                       f"positive budget, a multiple of {unit} patches")
    sds, i32, f32 = jax.ShapeDtypeStruct, jnp.int32, jnp.float32
    return qwen3_vl_decode.PromptMedia(
        patches=sds(lead + (n, self.cfg.vision.patch_dim), f32),
        layout=(sds(lead + (n, 4), i32), sds(lead + (n, 4), f32), sds(lead + (n, 2), i32),
                sds(lead + (n,), i32)),
        image_tokens=sds(lead, i32), position_ids=sds(lead + (3, prompt_len), i32))

  def load_hf(self, directory):
    from copd_jax.models import qwen3_vl_import
    cfg, params = qwen3_vl_import.load_qwen3_vl(directory, dtype=self.cfg.text.dtype)
    return cfg.with_execution_of(self.cfg), params

  def export_hf(self, out_dir, params, *, source_dir, tokenizer_dir, dtype,
                language_model_only):
    # config.json and the processor files: the source checkpoint's.
    from copd_jax.models import qwen3_vl_export
    qwen3_vl_export.export_qwen3_vl(out_dir, params, self.cfg, source_dir=source_dir,
                                    dtype=dtype)


_POLICY_OF_CONFIG = {ModelConfig: TextPolicy, Qwen3VLConfig: Qwen3VLPolicy}


def policy_of(model) -> Policy:
  """The Policy of a model config (a ModelConfig: TextPolicy; a Qwen3VLConfig:
  Qwen3VLPolicy); a policy comes back as it is. The one place where a config's kind picks
  the model code: what runs the model takes the policy object."""
  if isinstance(model, tuple(_POLICY_OF_CONFIG.values())):
    return model
  make = _POLICY_OF_CONFIG.get(type(model))
  if make is None:
    raise ValueError(f"cfg must be a ModelConfig or Qwen3VLConfig (or a models.policy "
                     f"policy), got {type(model).__name__}")
  return make(model)
