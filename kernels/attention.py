"""Causal grouped-query attention through JAX's Pallas splash-attention kernel.

The decoder's memory-efficient attention on TPU (`ModelConfig.attention_kernel`): the
kernel streams keys block by block with an online softmax, so no [T, T] score matrix
exists, forward or backward (it has its own backward kernels). Elsewhere the decoder uses
its chunked XLA attention (`ModelConfig.attention_block`), with the same signature and
values; this kernel also runs off TPU in interpret mode (slow: tests only).

Masks. A query at index i sits at key position `prefix_len + i` and sees the keys at or
before it (causal), among those in its segment: a valid query sees valid keys only. The
kernel needs every query to see at least one key, so invalid (padding) queries get
segment 0, like invalid keys: in self-attention (q_valid == kv_valid) a padding query
sees at least itself. Their outputs are garbage that the decoder never reads, as in the
dense path.

Shapes. The kernel's lane width is 128: both sequence lengths are padded up to multiples
of 128 (a third segment for the padding, which nobody real sees) and cut back after.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from copd_jax.kernels import sharded, tpu_tiles

LANES = 128  # the kernel's key blocks must be multiples of this
_PAD_SEGMENT = 2  # the segment of the rows and columns added to reach a multiple of LANES


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _block(length: int, largest: int) -> int:
  """The largest of largest, largest/2, ..., LANES that divides `length` (a multiple of LANES)."""
  block = max(LANES, largest // LANES * LANES)
  while length % block:
    block //= 2
  return max(block, LANES)


@functools.lru_cache(maxsize=64)
def _mask(q_len: int, kv_len: int, prefix_len: int, heads_per_kv: int):
  """The causal mask of one kv head's queries (one object per shape, so the kernel's own
  mask processing, cached on it, runs once per shape)."""
  return splash_mask.MultiHeadMask(
      [splash_mask.CausalMask((q_len, kv_len), offset=prefix_len)] * heads_per_kv)


def _kernel(q_len: int, kv_len: int, prefix_len: int, heads_per_kv: int, block: int,
            interpret: bool):
  """A splash MQA kernel for one kv head: q [heads_per_kv, q_len, Dh], k, v [kv_len, Dh].

  Built on every call, not cached: it holds its mask tables as arrays, which jnp stages
  into the trace that builds it, so a kernel kept from one trace would leak that trace's
  values into the next."""
  bq, bkv = _block(q_len, block), _block(kv_len, block)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                            block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                            block_q_dq=bq, block_kv_dq=bkv)
  return splash.make_splash_mqa(_mask(q_len, kv_len, prefix_len, heads_per_kv),
                                block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def splash_attention(q, k, v, q_valid, kv_valid, *, prefix_len: int = 0, block: int = 512,
                     interpret: bool | None = None):
  """Causal grouped-query attention (see the module docstring for the masks).

  q: [N, Tq, K, G, Dh], already scaled by Dh ** -0.5; k, v: [N, Tk, K, Dh] with
  Tk = prefix_len + Tq; q_valid: bool[N, Tq]; kv_valid: bool[N, Tk].
  block: the largest query / key block (a multiple of 128; smaller when the padded length
  calls for it). interpret: run the kernel in Pallas interpret mode (default: when the
  target is not a TPU; see tpu_tiles.target_platform).
  Returns f32[N, Tq, K, G, Dh].
  """
  n, tq, kv_heads, groups, hd = q.shape
  tk = k.shape[1]
  if tk != prefix_len + tq:
    raise ValueError(f"splash_attention: keys ({tk}) must be prefix_len ({prefix_len}) + "
                     f"queries ({tq})")
  if interpret is None:
    # The target, not the host: a deviceless TPU compile (under jax.set_mesh over TPU
    # devices) must lower the real kernel although the default backend is the CPU.
    interpret = tpu_tiles.target_platform() != "tpu"
  tq_pad = _round_up(tq, LANES)
  tk_pad = _round_up(prefix_len + tq_pad, LANES)  # every padded query has a padded key
  q_seg = jnp.pad(q_valid.astype(jnp.int32), [(0, 0), (0, tq_pad - tq)],
                  constant_values=_PAD_SEGMENT)
  kv_seg = jnp.pad(kv_valid.astype(jnp.int32), [(0, 0), (0, tk_pad - tk)],
                   constant_values=_PAD_SEGMENT)
  q = jnp.pad(q, [(0, 0), (0, tq_pad - tq), (0, 0), (0, 0), (0, 0)])
  k = jnp.pad(k, [(0, 0), (0, tk_pad - tk), (0, 0), (0, 0)])
  v = jnp.pad(v, [(0, 0), (0, tk_pad - tk), (0, 0), (0, 0)])
  kernel = _kernel(tq_pad, tk_pad, prefix_len, groups, int(block), bool(interpret))

  def one_row(q_row, k_row, v_row, q_seg_row, kv_seg_row):  # [Tq, K, G, Dh], [Tk, K, Dh]
    segments = splash.SegmentIds(q=q_seg_row, kv=kv_seg_row)
    per_kv_head = jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=segments))
    out = per_kv_head(jnp.transpose(q_row, (1, 2, 0, 3)),  # [K, G, Tq, Dh]
                      jnp.swapaxes(k_row, 0, 1), jnp.swapaxes(v_row, 0, 1))
    return jnp.transpose(out, (2, 0, 1, 3))  # [Tq, K, G, Dh]

  out = _rows_and_heads_over_mesh(jax.vmap(one_row), q, k, v, q_seg, kv_seg)
  return out[:, :tq].astype(jnp.float32)


def _rows_and_heads_over_mesh(fn, q, k, v, q_seg, kv_seg):
  """fn(q, k, v, q_seg, kv_seg) -> [N, Tq, K, G, Dh]; on a multi-device mesh inside
  shard_map (kernels/sharded.py): rows over the free batch axes and the kv heads K over
  `tensor` when it divides K (as MaxText shards splash attention), else rows over
  `tensor` too."""
  mesh = sharded.active_mesh()
  if mesh is None:
    return fn(q, k, v, q_seg, kv_seg)
  axes = sharded.free_axes(mesh)
  kv_heads = q.shape[2]
  if "tensor" in axes and kv_heads % mesh.shape["tensor"] == 0:
    rows = tuple(a for a in axes if a != "tensor")
    heads = (None, "tensor")  # the dimensions after the rows: [T, K, ...]
    return sharded.rows_over_mesh(fn, (q, k, v, q_seg, kv_seg), row_axes=rows,
                                  row_specs=(heads, heads, heads, (), ()), out_spec=heads)
  return sharded.rows_over_mesh(fn, (q, k, v, q_seg, kv_seg), row_axes=axes)


def dense_reference(q, k, v, q_valid, kv_valid, *, prefix_len: int = 0):
  """The same attention as explicit numpy (float64): the oracle of the tests.

  Valid queries only are meaningful; invalid ones return zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  q_valid, kv_valid = np.asarray(q_valid, bool), np.asarray(kv_valid, bool)
  n, tq, kv_heads, groups, hd = q.shape
  out = np.zeros(q.shape)
  for b in range(n):
    for i in range(tq):
      if not q_valid[b, i]:
        continue
      seen = kv_valid[b] & (np.arange(k.shape[1]) <= prefix_len + i)
      for h in range(kv_heads):
        for g in range(groups):
          scores = k[b, seen, h] @ q[b, i, h, g]
          weights = np.exp(scores - scores.max())
          out[b, i, h, g] = weights @ v[b, seen, h] / weights.sum()
  return out
