"""Model configuration: the decoder's sizes (ModelConfig) and the toy vision tower's (VisionConfig)."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Mapping

import jax.numpy as jnp
import numpy as np

COMPUTE_DTYPES = ("float32", "bfloat16")


# ModelConfig fields that change how the model is computed, not what it computes (nor
# its parameters): a checkpoint saved with any value serves every other value.
EXECUTION_FIELDS = ("remat", "attention_block", "attention_kernel")
# ModelConfig fields that change how the parameters are laid out, not their values:
# scan_layers stacks the decoder layers' parameters on a leading layer axis
# (layer_stack.stack_layers / unstack_layers convert between the layouts).
LAYOUT_FIELDS = ("scan_layers",)
ATTENTION_KERNELS = ("xla", "splash", "auto")
# config.model entries that are not ModelConfig fields (from_dict skips them): `lora`, how
# the run trains its branches (copd_jax.models.lora.spec_from_config reads it).
RUN_ONLY_FIELDS = ("lora",)


def require_positive_int(owner: str, name: str, value) -> int:
  """int(value), or a ValueError naming `owner.name` when value is not a positive integer."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A small ViT over video tubelets. Every input is a clip of `num_frames` frames."""
  image_size: int = 32
  patch_size: int = 8
  channels: int = 3
  num_frames: int = 4
  tubelet: int = 2  # frames per video patch
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128

  def __post_init__(self):
    self.validate()

  @property
  def num_tokens(self) -> int:
    """Vision embeddings per clip = placeholder tokens per vision prompt."""
    return (self.num_frames // self.tubelet) * (self.image_size // self.patch_size) ** 2

  @property
  def patch_dim(self) -> int:
    """Values in one tubelet: tubelet x patch x patch x channels."""
    return self.tubelet * self.patch_size ** 2 * self.channels

  def validate(self) -> None:
    for name in ("image_size", "patch_size", "channels", "num_frames", "tubelet", "width",
                 "depth", "num_heads", "mlp_dim"):
      require_positive_int("VisionConfig", name, getattr(self, name))
    if self.image_size % self.patch_size:
      raise ValueError(f"VisionConfig.image_size={self.image_size} must be a multiple of "
                       f"patch_size={self.patch_size}")
    if self.num_frames % self.tubelet:
      raise ValueError(f"VisionConfig.num_frames={self.num_frames} must be a multiple of "
                       f"tubelet={self.tubelet}")
    if self.width % self.num_heads:
      raise ValueError(f"VisionConfig.width={self.width} must be a multiple of "
                       f"num_heads={self.num_heads}")


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_plain_dict(mapping) -> dict:
  # ml_collections.ConfigDict has to_dict(); plain mappings are copied.
  return dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder sizes in Qwen3 terms. `vision` may be given as a dict (it is converted).

  `image_token_id` is the placeholder token that vision embeddings replace; it must be a
  valid token id when `vision` is set (-1 means "no placeholder" for text-only models).
  Construction validates; an invalid value raises ValueError naming the field.
  """
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute dtype; parameters are always f32
  vision: VisionConfig | None = None
  image_token_id: int = -1
  # Rematerialise each decoder layer in the backward pass (jax.checkpoint via nn.remat):
  # only layer inputs are kept, activations inside a layer are recomputed. Parameter
  # names are unchanged.
  remat: bool = False
  # Queries per attention block (0 = all at once). With a block, attention runs block by
  # block of queries, each block's scores [block, keys] rematerialised in the backward
  # pass, so no [T, T] score matrix of a whole sequence is ever built: the memory-efficient
  # attention for long sequences (training and teacher scoring). Same values.
  attention_block: int = 0
  # Which attention computes training and teacher scoring: "xla" (dense, or blocked with
  # attention_block), "splash" (JAX's Pallas splash-attention kernel: flash-style, on TPU;
  # interpret mode elsewhere, for tests) or "auto" (splash on TPU, xla elsewhere). The
  # sampler's decode steps always use xla (one query per row: no [T, T] scores).
  attention_kernel: str = "xla"
  # Run the decoder layers under one nn.scan instead of unrolled: the compiled program
  # holds ONE layer body, so compile time stops growing with depth (a 36-layer TPU compile
  # costs about what a 2-layer one does). Parameters are stacked with a leading layer axis
  # (`layers/...` [L, ...] instead of `layers_{i}/...`; layer_stack.stack_layers converts) and
  # the KV cache is one LayerCache with a leading layer axis. Same values up to float
  # rounding; remat (above) applies inside the scan.
  scan_layers: bool = False

  def __post_init__(self):
    if self.vision is not None and not isinstance(self.vision, VisionConfig):
      if not (isinstance(self.vision, Mapping) or hasattr(self.vision, "to_dict")):
        raise ValueError(f"ModelConfig.vision must be a VisionConfig, a mapping or None, "
                         f"got {type(self.vision).__name__}")
      vision_fields = _as_plain_dict(self.vision)
      known = {f.name for f in dataclasses.fields(VisionConfig)}
      unknown = sorted(set(vision_fields) - known)
      if unknown:
        raise ValueError(f"ModelConfig.vision has unknown fields {unknown}")
      object.__setattr__(self, "vision", VisionConfig(**vision_fields))
    self.validate()

  @classmethod
  def from_dict(cls, d) -> "ModelConfig":
    """From a dict or an ml_collections ConfigDict (unknown fields raise ValueError;
    RUN_ONLY_FIELDS are skipped)."""
    fields = {k: v for k, v in _as_plain_dict(d).items() if k not in RUN_ONLY_FIELDS}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"ModelConfig has no fields {unknown}")
    return cls(**fields)

  @property
  def uses_splash_attention(self) -> bool:
    """True when attention runs through the Pallas splash kernel (see attention_kernel)."""
    if self.attention_kernel == "auto":
      import jax  # here, not at import time: the backend is chosen when first used
      return jax.default_backend() == "tpu"
    return self.attention_kernel == "splash"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def validate(self) -> None:
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim"):
      require_positive_int("ModelConfig", name, getattr(self, name))
    if isinstance(self.attention_block, bool) or not isinstance(self.attention_block, int) \
        or self.attention_block < 0:
      raise ValueError(f"ModelConfig.attention_block must be an integer >= 0 (0 = no "
                       f"blocking), got {self.attention_block!r}")
    if self.attention_kernel not in ATTENTION_KERNELS:
      raise ValueError(f"ModelConfig.attention_kernel must be one of {ATTENTION_KERNELS}, "
                       f"got {self.attention_kernel!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even "
                       "(rotary embeddings rotate pairs)")
    if not (_is_real(self.rope_theta) and self.rope_theta > 0):
      raise ValueError(f"ModelConfig.rope_theta must be positive, got {self.rope_theta!r}")
    if not (_is_real(self.rms_norm_eps) and self.rms_norm_eps > 0):
      raise ValueError(f"ModelConfig.rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
    if not isinstance(self.tie_embeddings, (bool, np.bool_)):
      raise ValueError(f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
    if not isinstance(self.remat, (bool, np.bool_)):
      raise ValueError(f"ModelConfig.remat must be a bool, got {self.remat!r}")
    if not isinstance(self.scan_layers, (bool, np.bool_)):
      raise ValueError(f"ModelConfig.scan_layers must be a bool, got {self.scan_layers!r}")
    if self.dtype not in COMPUTE_DTYPES:
      raise ValueError(f"ModelConfig.dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
    if self.vision is not None:
      if not isinstance(self.vision, VisionConfig):
        raise ValueError(f"ModelConfig.vision must be a VisionConfig, got {self.vision!r}")
      self.vision.validate()
      if isinstance(self.image_token_id, bool) or not isinstance(
          self.image_token_id, (int, np.integer)) or not 0 <= self.image_token_id < self.vocab_size:
        raise ValueError(f"ModelConfig.image_token_id must be a token id in "
                         f"[0, vocab_size={self.vocab_size}) when vision is set, "
                         f"got {self.image_token_id!r}")


def with_execution_of(cfg: "ModelConfig", other: "ModelConfig") -> "ModelConfig":
  """cfg with other's execution settings and parameter layout (EXECUTION_FIELDS and
  LAYOUT_FIELDS: how to compute, not what), so two configs of one model compare equal
  whatever remat, attention kernel or layer scan each uses. (A Hugging Face checkpoint is
  always unrolled: its loader's params are stacked afterwards when scan_layers is on.)"""
  return dataclasses.replace(cfg, **{name: getattr(other, name)
                                     for name in EXECUTION_FIELDS + LAYOUT_FIELDS})
