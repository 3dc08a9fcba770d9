"""Building blocks shared by every model: Linear, RMSNorm, SwiGLU and rotary angles (1-D and multimodal).

Every parameter declares its logical axes where it is created (flax partitioning metadata,
`nn.with_logical_partitioning`): e.g. Linear(..., axes=("embed", "heads")) makes a kernel
[in, out] named (embed, heads) and a bias named (heads,). The model's init functions unbox
them, so the parameter pytree the rest of the code sees holds plain arrays;
copd_jax.models.partitioning reads the names back from an abstract boxed init, and
copd_jax.sharding maps them to mesh axes. A parameter created without names is an error
there (never silently replicated).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


Axes = Sequence[str | None]


def with_axes(init, axes: Axes | None):
  """init with its logical axis names attached (None: no names, which the sharding code
  rejects, naming the parameter)."""
  return init if axes is None else nn.with_logical_partitioning(init, tuple(axes))


@jax.custom_vjp
def project(x, kernel):
  """x [..., in] @ kernel [in, out] -> f32[..., out] (f32 accumulation; x and kernel in the
  same compute dtype).

  The same products as jnp.einsum's own gradient, in the order XLA:CPU runs without
  copies: autodiff writes the kernel's gradient as (dy^T x)^T, and XLA:CPU then copies the
  [tokens, out] cotangent into a transposed [out, tokens] array before the dot and
  transposes the result back; here it is x^T dy, one dot that contracts the token axes of
  both operands in place."""
  return _project(x, kernel)


def _project(x, kernel):
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _project_fwd(x, kernel):
  return _project(x, kernel), (x, kernel)


def _project_bwd(residuals, dy):
  """dy f32[..., out] -> (dx [..., in], dkernel [in, out]) in the inputs' dtypes.

  Both dots take their inputs in the compute dtype with f32 accumulation, as the forward
  does: with bf16 inputs the f32 cotangent is rounded to bf16 first (in f32 nothing
  changes). Without the cast jax promotes the bf16 operand to f32, and the backward, 2/3
  of a training step's matmul FLOPs, runs as f32 dots."""
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  tokens = tuple(range(x.ndim - 1))
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)
  dkernel = jax.lax.dot_general(x, dy, ((tokens, tokens), ((), ())),
                                preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


project.defvjp(_project_fwd, _project_bwd)


class Linear(nn.Module):
  """y = x @ kernel (+ bias); kernel f32 [in, out], matmul in `dtype`, f32 accumulation.
  axes: logical names of the kernel's (in, out) axes; the bias takes the out name.
  When the params hold 'lora_a' / 'lora_b' next to the kernel (a LoRA branch, see
  copd_jax.models.lora) the low-rank term is added; init never creates them."""
  features: int
  dtype: Any = jnp.float32
  use_bias: bool = False
  axes: Axes | None = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", with_axes(nn.initializers.lecun_normal(), self.axes),
                        (x.shape[-1], self.features), jnp.float32)
    y = project(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.has_variable("params", "lora_a"):  # a LoRA branch (copd_jax.models.lora)
      y = y + self._low_rank(x)
    if self.use_bias:
      bias_axes = None if self.axes is None else tuple(self.axes)[-1:]
      y = y + self.param("bias", with_axes(nn.initializers.zeros, bias_axes), (self.features,),
                         jnp.float32)
    return y

  def _low_rank(self, x):
    """(x @ A^T) @ B^T through rank r: lora_a [r, in], lora_b [out, r] (already scaled by
    alpha / r, see lora.model_params); matmuls in `dtype`, f32 accumulation."""
    a = self.get_variable("params", "lora_a").astype(self.dtype)
    b = self.get_variable("params", "lora_b").astype(self.dtype)
    down = jnp.einsum("...i,ri->...r", x.astype(self.dtype), a,
                      preferred_element_type=jnp.float32)
    return jnp.einsum("...r,or->...o", down.astype(self.dtype), b,
                      preferred_element_type=jnp.float32)


def layer_norm(eps: float, name: str, axes: Axes = ("norm",)) -> nn.LayerNorm:
  """flax's LayerNorm (f32) with its scale and bias named `axes`."""
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name,
                      scale_init=with_axes(nn.initializers.ones, axes),
                      bias_init=with_axes(nn.initializers.zeros, axes))


class RMSNorm(nn.Module):
  """Qwen3 RMSNorm over the last axis, statistics in f32: x * rsqrt(mean(x^2) + eps) * scale."""
  eps: float = 1e-6
  axes: Axes = ("norm",)  # the scale's logical axis

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", with_axes(nn.initializers.ones, self.axes), (x.shape[-1],),
                       jnp.float32)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return x * scale


def rope_angles(positions, head_dim: int, theta: float):
  """1-D rotary angles: positions int32[B, T] -> f32[B, T, head_dim/2]."""
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x, positions, theta: float):
  """Rotary embedding, HF "rotate_half" convention (first half pairs with second half).

  x: f32[B, T, N, Dh]; positions: int32[B, T] -> f32[B, T, N, Dh].
  """
  return rotate_with_angles(x, rope_angles(positions, x.shape[-1], theta))


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x))."""
  hidden: int
  out: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    gate = Linear(self.hidden, self.dtype, axes=("embed", "mlp"), name="gate_proj")(x)
    up = Linear(self.hidden, self.dtype, axes=("embed", "mlp"), name="up_proj")(x)
    return Linear(self.out, self.dtype, axes=("mlp", "embed"),
                  name="down_proj")(jax.nn.silu(gate) * up)


def rotate_with_angles(x, angles):
  """HF rotate_half rotary: x f32[..., N, Dh], angles f32[..., Dh/2] (broadcast over N)."""
  half = x.shape[-1] // 2
  cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def mrope_angles(position_ids, head_dim: int, theta: float, mrope_section):
  """Interleaved multimodal rotary angles.

  position_ids: int[3, B, T] (t, h, w) -> f32[B, T, head_dim/2]. Pair j takes its position
  from h if j % 3 == 1 and j < 3*section[1], from w if j % 3 == 2 and j < 3*section[2],
  else from t.
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  j = np.arange(half)
  axis = np.zeros(half, np.int32)
  axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
  axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
  pos = position_ids.astype(jnp.float32)[jnp.asarray(axis)]  # [half, B, T]
  return jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq, jnp.float32)
