"""The toy suite's vision tower: a tubelet ViT whose tokens replace the image placeholders."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from copd_jax.models.layers import Linear, layer_norm, with_axes
from copd_jax.models.model_config import VisionConfig


def clip_to_tubelets(clip, vcfg: VisionConfig):
  """f32[B, F, H, W, C] -> f32[B, N, tubelet*patch*patch*C], N = vcfg.num_tokens.

  Tokens are ordered (time, row, column), i.e. all patches of the first tubelet first.
  """
  b = clip.shape[0]
  t, p, c = vcfg.tubelet, vcfg.patch_size, vcfg.channels
  nt, nh = vcfg.num_frames // t, vcfg.image_size // p
  x = clip.reshape(b, nt, t, nh, p, nh, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [B, nt, nh, nw, t, p, p, C]
  return x.reshape(b, nt * nh * nh, t * p * p * c)


class VisionBlock(nn.Module):
  """Pre-norm ViT block with full (non-causal) attention."""
  vcfg: VisionConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    vcfg, dt = self.vcfg, self.dtype
    b, n, w = x.shape
    hd = w // vcfg.num_heads
    h = layer_norm(1e-6, "norm1")(x)
    qkv = Linear(3 * w, dt, use_bias=True, axes=("vision_embed", "vision_heads"),
                 name="qkv")(h).reshape(b, n, 3, vcfg.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", (q * hd ** -0.5).astype(dt), k.astype(dt),
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1)
    attn = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dt), v.astype(dt),
                      preferred_element_type=jnp.float32).reshape(b, n, w)
    x = x + Linear(w, dt, use_bias=True, axes=("vision_heads", "vision_embed"),
                   name="proj")(attn)
    h = layer_norm(1e-6, "norm2")(x)
    h = Linear(vcfg.mlp_dim, dt, use_bias=True, axes=("vision_embed", "vision_mlp"),
               name="linear_fc1")(h)
    h = Linear(w, dt, use_bias=True, axes=("vision_mlp", "vision_embed"),
               name="linear_fc2")(jax.nn.gelu(h))
    return x + h


class Projector(nn.Module):
  """Vision width -> LM width ("merger" in Qwen-VL): LayerNorm, then a 2-layer GELU MLP."""
  d_model: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = layer_norm(1e-6, "norm")(x)
    x = Linear(self.d_model, self.dtype, use_bias=True, axes=("vision_embed", "mlp"),
               name="linear_fc1")(x)
    return Linear(self.d_model, self.dtype, use_bias=True, axes=("mlp", "embed"),
                  name="linear_fc2")(jax.nn.gelu(x))


class VisionEncoder(nn.Module):
  """Clip f32[B, F, H, W, C] -> embeddings f32[B, num_tokens, d_model] at the LM width."""
  vcfg: VisionConfig
  d_model: int
  dtype: Any

  @nn.compact
  def __call__(self, clip):
    vcfg = self.vcfg
    # A Dense over a flattened tubelet == a Conv3d with stride equal to its kernel.
    x = Linear(vcfg.width, self.dtype, use_bias=True, axes=("vision_patch", "vision_embed"),
               name="patch_embed")(clip_to_tubelets(clip.astype(jnp.float32), vcfg))
    x = x + self.param("pos_embed", with_axes(nn.initializers.normal(0.02),
                                              ("vision_positions", "vision_embed")),
                       (vcfg.num_tokens, vcfg.width), jnp.float32)
    for i in range(vcfg.depth):
      x = VisionBlock(vcfg, self.dtype, name=f"blocks_{i}")(x)
    return Projector(self.d_model, self.dtype, name="merger")(x)


def replace_placeholders(embeds, tokens, vision_embeds, image_token_id: int):
  """Puts the k-th vision embedding of a row at that row's k-th placeholder token.

  embeds: f32[B, T, D]; tokens: int32[B, T]; vision_embeds: f32[B, N, D] -> f32[B, T, D].
  Rows without placeholders are unchanged. Placeholders beyond the N-th reuse the last
  embedding (the data code guarantees exactly N per vision prompt).
  """
  is_placeholder = tokens == image_token_id
  order = jnp.cumsum(is_placeholder, axis=1) - 1  # k for the k-th placeholder
  order = jnp.clip(order, 0, vision_embeds.shape[1] - 1)
  gathered = jnp.take_along_axis(vision_embeds, order[..., None], axis=1)
  return jnp.where(is_placeholder[..., None], gathered.astype(embeds.dtype), embeds)
