"""Which TPU generation a trace targets, its VMEM budget, and the Pallas kernels' default tiles.

Why a budget. A Pallas TPU kernel's blocks, scratch and temporaries live in the core's
VMEM, inside a "scoped" limit that the Mosaic compiler enforces at compile time
(`CompileTimeScopedVmemOom`). The compiler's default limit (16 MiB on v5e and v5p, 32 MiB
on v6e) is a small part of the core's VMEM (128 MiB on v5e and v6e, 64 MiB on v5p), and
the LM-head kernels need more at real model sizes: the backward d_hidden kernel holds a
[token_tile, D] f32 accumulator, a [token_tile, D] input and output block and a
[D, vocab_tile] head block, each double-buffered by the pipeline (28.5 MiB at D = 4096
with 256 x 512 tiles, the compiler's figure on v5p). So each kernel asks for `vmem_limit_bytes` = 3/4 of its generation's
VMEM per core (the rest is left to the compiler's internal scratch), and the default tiles
are the largest, in order of preference, whose estimated VMEM (`op_vmem_bytes`, an upper
bound of what the compiler reported for these kernels, checked in
tests/kernels/test_pallas_tpu.py) fits in that limit.

Why per generation. The head is streamed from HBM once per token tile, so the kernels do
about token_tile FLOPs per byte of head read; a chip keeps its matrix units busy above its
peak-FLOP/s : HBM-bandwidth ratio: about 240 on v5e (197 TFLOP/s bf16, 819 GB/s), 166 on
v5p (459 TFLOP/s, 2.77 TB/s), 560 on v6e (918 TFLOP/s, 1.64 TB/s) (Google Cloud TPU
documentation, "TPU v5e", "TPU v5p", "TPU v6e" pages; jax's own table,
`pltpu.get_tpu_info_for_chip`, gives 240, 187 and 561). Hence token tiles of 256 on v5e
and v5p and 512 on v6e, whose VMEM is large enough for them.

Why the hidden dimension is not tiled. A [token_tile, D] row block stays in VMEM for the
whole vocabulary sweep, so hidden states are read from HBM once per token tile; a grid
that also splits D re-reads them once per vocabulary tile (V / vocab_tile ~ 300 times at
V = 151,936), about 50% more HBM traffic for the forward at token_tile 256, and its
backward must either recompute each logit tile once per D block or keep a second pass
over D. Whole row blocks fit the models we train: at D = 4,096 the largest kernel
(d_head, 256 x 512 tiles) takes 33.8 MiB of v5p's 48 MiB limit (the compiler's figure);
a larger D gets smaller vocabulary, then token, tiles, and a D whose 128 x 128 tiles do not
fit raises a ValueError naming it (use the chunked backend there).

Which generation. At trace time: the device of the mesh set by `jax.set_mesh` (what a
deviceless compile for a TPU topology sets), else the default device when it is a TPU,
else none is known and the defaults are those of the smallest-VMEM generation among v5e,
v5p and v6e (v5p), which therefore compile on all three.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

# device_kind strings of TPU devices (real or abstract) -> generation name.
_DEVICE_KINDS = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e", "TPU v5e": "v5e",
    "TPU v5": "v5p", "TPU v5p": "v5p",
    "TPU v6 lite": "v6e", "TPU v6e": "v6e",
}
GENERATIONS = ("v4", "v5e", "v5p", "v6e")
# When the generation is unknown: the one with the least VMEM among v5e, v5p and v6e.
FALLBACK_GENERATION = "v5p"
VMEM_LIMIT_FRACTION = 0.75
# Preferred token tile per generation (see the module docstring: FLOPs per head byte).
PREFERRED_TOKEN_TILE = {"v4": 256, "v5e": 256, "v5p": 256, "v6e": 512}
PREFERRED_VOCAB_TILE = 512
OPS = ("token_logprob_entropy", "reverse_kl", "top_k_logprobs")
LANES, F32 = 128, 4


class Tiles(NamedTuple):
  """Tiles and scoped-VMEM limit of one op's kernels (hashable: a static argument)."""

  token_tile: int
  vocab_tile: int
  vmem_limit_bytes: int


def generation_of_device_kind(device_kind: str) -> str | None:
  """'TPU v5 lite' -> 'v5e'; None for anything that is not a known TPU."""
  return _DEVICE_KINDS.get(device_kind)


def _target_device():
  """(platform, device_kind) of what the current trace compiles for."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None:
    return abstract.platform, abstract.device_kind
  device = jax.devices()[0]
  return device.platform, device.device_kind


def target_platform() -> str:
  """'tpu', 'cpu', ...: the mesh set by jax.set_mesh if any, else the default backend."""
  return _target_device()[0]


def current_generation() -> str | None:
  """The TPU generation this trace compiles for, or None when unknown (see module doc)."""
  platform, kind = _target_device()
  return generation_of_device_kind(kind) if platform == "tpu" else None


def _check_generation(generation):
  if generation not in GENERATIONS:
    raise ValueError(f"TPU generation must be one of {GENERATIONS} (or None for unknown), "
                     f"got {generation!r}")


@functools.cache
def vmem_limit_bytes(generation: str | None) -> int:
  """The scoped-VMEM limit the kernels ask for: 3/4 of the generation's VMEM per core."""
  generation = generation or FALLBACK_GENERATION
  _check_generation(generation)
  info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(generation), 1)
  return int(info.vmem_capacity_bytes * VMEM_LIMIT_FRACTION)


# ------------------------------------------------------------------ VMEM estimates
def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def block_bytes(rows: int, cols: int, dtype) -> int:
  """VMEM bytes of a [rows, cols] block: padded to (sublanes, 128 lanes) tiles; sublanes
  are 8 for 32-bit types, 16 for 16-bit ones (two rows packed per 32-bit word)."""
  itemsize = np.dtype(dtype).itemsize
  sublanes = 8 * max(1, 4 // itemsize)
  return _round_up(rows, sublanes) * _round_up(cols, LANES) * itemsize


# f32 [token_tile, vocab_tile] temporaries live at once (logits, exp, masks, ...): an upper
# bound of what the compiler allocated for each kernel body (checked at real shapes in
# tests/kernels/test_pallas_tpu.py, which compares these estimates with the compiler's figures).
_TILE_TEMPORARIES = {"stats_fwd": 8, "rkl_fwd": 12, "d_hidden": 10, "d_head": 10,
                     "top_k": 26}


def _pipelined(*blocks):
  """Input and output blocks are double-buffered by the Pallas pipeline."""
  return 2 * sum(blocks)


def kernel_vmem_bytes(token_tile: int, vocab_tile: int, *, hidden: int, hidden_dtype,
                      head_dtype, op: str, teacher_hidden: int | None = None,
                      top_k: int = 16) -> dict[str, int]:
  """Estimated scoped VMEM (bytes) of each Pallas kernel of `op` at these tiles.

  hidden / teacher_hidden: D of the student / teacher; dtypes those of the hidden states
  and the head (matmuls run in the hidden dtype). Returns {kernel name: bytes}.
  """
  if op not in OPS:
    raise ValueError(f"op must be one of {OPS}, got {op!r}")
  tm, tv, d = token_tile, vocab_tile, hidden
  column = block_bytes(tm, 1, jnp.float32)  # per-token f32 [tm, 1] vectors (lane-padded)
  rows = block_bytes(tm, d, hidden_dtype)
  head = block_bytes(d, tv, head_dtype)
  # Matmul operands cast to the hidden dtype (the head, when it is wider) or transposed.
  head_operand = block_bytes(d, tv, hidden_dtype)
  tile = block_bytes(tm, tv, jnp.float32)
  if op == "top_k_logprobs":
    k_block = block_bytes(tm, top_k, jnp.float32)
    return {"top_k_logprobs": _pipelined(rows, head, 2 * k_block) + 2 * column + 2 * k_block
            + head_operand + _TILE_TEMPORARIES["top_k"] * tile}
  if op == "token_logprob_entropy":
    row_extra, col_extra, fwd_temps = 5 * column, 0, _TILE_TEMPORARIES["stats_fwd"]
    forward = _pipelined(rows, head, column, 3 * column) + 4 * column
  else:
    dt = teacher_hidden or d
    t_rows, t_head = block_bytes(tm, dt, hidden_dtype), block_bytes(dt, tv, head_dtype)
    row_extra, col_extra, fwd_temps = t_rows + 4 * column, t_head, _TILE_TEMPORARIES["rkl_fwd"]
    forward = _pipelined(rows, head, t_rows, t_head, 3 * column) + 5 * column
    head_operand += block_bytes(dt, tv, hidden_dtype)
  forward += head_operand + fwd_temps * tile
  inputs = (rows, head, row_extra, col_extra)
  d_hidden = (_pipelined(*inputs, rows) + block_bytes(tm, d, jnp.float32) + head_operand
              + _TILE_TEMPORARIES["d_hidden"] * tile)
  d_head = (_pipelined(*inputs, head) + block_bytes(d, tv, jnp.float32) + head_operand
            + rows + _TILE_TEMPORARIES["d_head"] * tile)
  prefix = "token_logprob_entropy" if op == "token_logprob_entropy" else "reverse_kl"
  return {f"{prefix}_fwd": forward, f"{prefix}_d_hidden": d_hidden,
          f"{prefix}_d_head": d_head}


# ------------------------------------------------------------------ default tiles
def _candidates(generation: str):
  """(token_tile, vocab_tile) in order of preference: the generation's token tile, then
  halving the vocabulary tile down to 128, then halving the token tile down to 128."""
  tm = PREFERRED_TOKEN_TILE[generation]
  while tm >= 128:
    tv = PREFERRED_VOCAB_TILE
    while tv >= 128:
      yield tm, tv
      tv //= 2
    tm //= 2


@functools.cache
def _default_tiles(generation, hidden, hidden_dtype, head_dtype, op, teacher_hidden, top_k):
  limit = vmem_limit_bytes(generation)
  generation = generation or FALLBACK_GENERATION
  for tm, tv in _candidates(generation):
    estimate = kernel_vmem_bytes(tm, tv, hidden=hidden, hidden_dtype=hidden_dtype,
                                 head_dtype=head_dtype, op=op, teacher_hidden=teacher_hidden,
                                 top_k=top_k)
    if max(estimate.values()) <= limit:
      return Tiles(tm, tv, limit)
  raise ValueError(
      f"pallas {op}: hidden size D={hidden}"
      f"{'' if teacher_hidden is None else f' (teacher D={teacher_hidden})'} is too large "
      f"for the {generation} VMEM budget ({limit / 2**20:.0f} MiB) even with 128 x 128 "
      "tiles; use KernelConfig(backend='chunked') for this model")


def default_tiles(generation: str | None, hidden: int, vocab: int | None = None,
                  dtype=jnp.bfloat16, *, head_dtype=None, op: str = "token_logprob_entropy",
                  teacher_hidden: int | None = None, top_k: int = 16) -> Tiles:
  """The tiles the pallas backend uses by default for `op` on a TPU generation.

  generation: 'v4', 'v5e', 'v5p', 'v6e', or None (unknown: v5p's, which fit all three
  of v5e, v5p and v6e). hidden: D; vocab: V (unused: tiles need not divide V; kept so
  callers state the shape); dtype: the hidden states' dtype; head_dtype: the head's
  (default: dtype). op: 'token_logprob_entropy' (forward and backward), 'reverse_kl'
  (with teacher_hidden, the teacher's D; default hidden) or 'top_k_logprobs' (top_k).
  Returns Tiles(token_tile, vocab_tile, vmem_limit_bytes).
  """
  del vocab
  if generation is not None:
    _check_generation(generation)
  head_dtype = dtype if head_dtype is None else head_dtype
  return _default_tiles(generation, int(hidden), np.dtype(dtype), np.dtype(head_dtype), op,
                        teacher_hidden, int(top_k))


def resolve_tiles(token_tile: int | None, vocab_tile: int | None, *, hidden: int,
                  hidden_dtype, head_dtype, op: str, teacher_hidden: int | None = None,
                  top_k: int = 16) -> Tiles:
  """Tiles for a call: the user's where given, the generation's defaults elsewhere; the
  VMEM limit is always the generation's (so a tile too large fails to compile)."""
  if token_tile is not None and vocab_tile is not None:
    return Tiles(token_tile, vocab_tile, vmem_limit_bytes(current_generation()))
  defaults = default_tiles(current_generation(), hidden, dtype=hidden_dtype,
                           head_dtype=head_dtype, op=op, teacher_hidden=teacher_hidden,
                           top_k=top_k)
  return Tiles(defaults.token_tile if token_tile is None else token_tile,
               defaults.vocab_tile if vocab_tile is None else vocab_tile,
               defaults.vmem_limit_bytes)
