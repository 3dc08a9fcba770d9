"""Which implementation a fused op uses, and the checks every op runs on its inputs."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from copd_jax.kernels import tpu_tiles

BACKENDS = ("reference", "chunked", "pallas")
INTERPRET_MODES = (False, True, "tpu")
# None for pallas: the kernels pick the TPU generation's tiles at trace time
# (kernels/tpu_tiles.py: default_tiles, from a VMEM byte budget).
DEFAULT_TOKEN_TILES = {"reference": 0, "chunked": 2048, "pallas": None}
DEFAULT_VOCAB_TILES = {"reference": 0, "chunked": 2048, "pallas": None}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Backend and tiling of the fused LM-head ops (hashable: a static jit argument).

  Attributes:
    backend: 'reference' (dense logits, the oracle; memory O(tokens x vocab)),
      'chunked' (XLA scans over token chunks and vocabulary tiles; portable, memory
      O(token_tile x vocab_tile)),
      'pallas' (TPU Mosaic kernel with VMEM scratch; tokens x vocab grid).
    vocab_tile: vocabulary columns per tile; need not divide V. None picks the
      backend's default: 2048 for chunked; for pallas, the TPU generation's tile from
      its VMEM budget (`tpu_tiles.default_tiles`: 512 unless D is large).
    token_tile: tokens per tile; need not divide the number of tokens. None picks the
      backend's default: 2048 for chunked (fewer read-modify-writes of the [D, V] head
      gradient, one per token chunk); for pallas the generation's (256 on v5e and v5p,
      512 on v6e, less when D is large). A pallas tile too large for VMEM fails to
      compile (CompileTimeScopedVmemOom).
    interpret: pallas only. False compiles for TPU; True runs Pallas's generic
      interpreter (any platform); 'tpu' runs the TPU interpret mode, which simulates
      VMEM/SMEM and fills out-of-bounds block reads with NaN (catches missing masks).
  """

  backend: str = "chunked"
  vocab_tile: int | None = None
  token_tile: int | None = None
  interpret: bool | str = False

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(
          f"KernelConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
    for name in ("vocab_tile", "token_tile"):
      value = getattr(self, name)
      if value is None:
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"KernelConfig.{name} must be a positive int, got {value!r}")
    if self.interpret not in INTERPRET_MODES:
      raise ValueError(
          f"KernelConfig.interpret must be one of {INTERPRET_MODES}, got {self.interpret!r}")
    if self.interpret is not False and self.backend != "pallas":
      raise ValueError("KernelConfig.interpret only applies to backend='pallas'")

  @property
  def tokens_per_tile(self) -> int | None:
    """token_tile, or the backend's default when it is None (None for pallas: chosen
    per TPU generation at trace time)."""
    if self.token_tile is not None:
      return self.token_tile
    return DEFAULT_TOKEN_TILES[self.backend]

  @property
  def columns_per_tile(self) -> int | None:
    """vocab_tile, or the backend's default when it is None (None for pallas: chosen
    per TPU generation at trace time)."""
    if self.vocab_tile is not None:
      return self.vocab_tile
    return DEFAULT_VOCAB_TILES[self.backend]

  def check_platform(self):
    """Raise if the pallas backend cannot run on this platform (called at trace time)."""
    if self.backend != "pallas" or self.interpret is not False:
      return
    # The mesh set by jax.set_mesh names the target of a deviceless TPU compile.
    platform = tpu_tiles.target_platform()
    if platform == "cpu":
      raise ValueError(
          "KernelConfig.interpret: the pallas backend cannot compile for cpu; "
          "use interpret=True or interpret='tpu' (or backend='chunked')")
    if platform != "tpu":
      raise NotImplementedError(
          f"KernelConfig.backend='pallas' is a TPU Mosaic kernel (VMEM scratch); "
          f"compiling it for {platform!r} is not implemented. Use backend='chunked' "
          "there (or interpret=True to run the kernel in the interpreter).")
    if (self.vocab_tile or 128) % 128 or (self.token_tile or 8) % 8:
      raise ValueError(
          "KernelConfig: on TPU vocab_tile must be a multiple of 128 and token_tile a "
          f"multiple of 8, got vocab_tile={self.vocab_tile}, "
          f"token_tile={self.token_tile}")


def check_lm_head_inputs(hidden, head, tokens=None, *, prefix: str = ""):
  """Shape/dtype checks for hidden: float[N, D], head: float[D, V], tokens: int[N]."""
  if hidden.ndim != 2:
    raise ValueError(f"{prefix}hidden must be [tokens, hidden_dim], got shape {hidden.shape}")
  if head.ndim != 2:
    raise ValueError(f"{prefix}head must be [hidden_dim, vocab], got shape {head.shape}")
  if hidden.shape[1] != head.shape[0]:
    raise ValueError(
        f"{prefix}head's first axis ({head.shape[0]}) must equal hidden's last axis "
        f"({hidden.shape[1]}); head is [hidden_dim, vocab] (an embedding table must be "
        "transposed)")
  for name, x in ((f"{prefix}hidden", hidden), (f"{prefix}head", head)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
  if tokens is not None:
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"{prefix}tokens must be an integer array, got dtype {tokens.dtype}")
    if tokens.shape != hidden.shape[:1]:
      raise ValueError(
          f"{prefix}tokens must be [{hidden.shape[0]}] to match hidden, "
          f"got shape {tokens.shape}")


def check_per_token(name: str, x, num_tokens: int, *, allow_scalar: bool = False):
  """A per-token vector must be [num_tokens] (or a scalar where allowed) and float/bool."""
  if x is None:
    return
  if allow_scalar and jnp.ndim(x) == 0:
    return
  if jnp.shape(x) != (num_tokens,):
    raise ValueError(f"{name} must have shape [{num_tokens}], got {jnp.shape(x)}")
