"""Attention arithmetic of the decoder, outside the flax modules: masked softmax, dense
and query-blocked attention, attention over a shared prompt prefix plus per-row response
slots (the KV cache while decoding, `LayerCache`), the in-place slot write, and the
Pallas splash path. Shapes: N rows = B prompts x G samples, K key/value heads, H query
heads, Dh head size, P prompt columns, R response slots, T new columns."""
from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

from copd_jax.kernels import attention as attention_kernels

# Finite (not -inf) so a query whose keys are all padding gets uniform weights, not NaN.
_MASKED_SCORE = -1e30


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a, b):
  """jnp.einsum(spec, a, b) accumulated in f32 (a, b in one compute dtype), whose gradient
  dots also take their inputs in the compute dtype with f32 accumulation: the f32
  cotangent is rounded to a's dtype first, as layers.project does (f32 is unchanged).
  Without it jax's own gradient promotes a bf16 operand to f32 and runs f32 dots, with an
  f32 copy of every bf16 operand. spec: "A,B->C" where every index of A appears in B or C
  and every index of B in A or C (no index summed within one operand)."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
  return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, residuals, ct):
  """da = einsum("C,B->A", ct, b), db = einsum("C,A->B", ct, a), in the operands' dtypes.
  In f32: jax's own gradient of the einsum (the same values, bit for bit)."""
  a, b = residuals
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    return jax.vjp(lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32),
                   a, b)[1](ct)
  operands, out = spec.split("->")
  in_a, in_b = operands.split(",")
  ct = ct.astype(a.dtype)
  da = _einsum_canonical(out, in_b, in_a, ct, b).astype(a.dtype)
  db = _einsum_canonical(out, in_a, in_b, ct, a).astype(b.dtype)
  return da, db


def _einsum_canonical(x_spec: str, y_spec: str, out_spec: str, x, y):
  """einsum(f"{x_spec},{y_spec}->{out_spec}", x, y) accumulated in f32, computed as one
  batched matmul [B, M, K] x [B, K, N] (the batch indices, x's free indices, the summed
  indices and y's free indices each flattened into one axis), then reshaped and transposed
  to out_spec. XLA:CPU runs a bf16 x bf16 -> f32 dot only where a matmul library takes it:
  a dot with several batch axes and its summed axis in the middle was left to its generic
  dot, which has no bf16 x bf16 -> f32 kernel and failed at run time ("Unsupported element
  type for DotThunk::Execute") in the vmapped update of the shared-prefix forward."""
  batch = [i for i in x_spec if i in y_spec and i in out_spec]
  x_free = [i for i in x_spec if i in out_spec and i not in batch]
  y_free = [i for i in y_spec if i in out_spec and i not in batch]
  contract = [i for i in x_spec if i in y_spec and i not in out_spec]
  size = dict(zip(x_spec, x.shape)) | dict(zip(y_spec, y.shape))
  n_batch, n_x, n_contract, n_y = (math.prod(size[i] for i in idx)
                                   for idx in (batch, x_free, contract, y_free))
  xm = x.transpose([x_spec.index(i) for i in batch + x_free + contract]).reshape(
      n_batch, n_x, n_contract)
  ym = y.transpose([y_spec.index(i) for i in batch + contract + y_free]).reshape(
      n_batch, n_contract, n_y)
  z = jax.lax.dot_general(xm, ym, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  dot_spec = "".join(batch + x_free + y_free)
  z = z.reshape([size[i] for i in dot_spec])
  return z.transpose([dot_spec.index(i) for i in out_spec])


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


@flax.struct.dataclass
class LayerCache:
  """One layer's keys/values while decoding; the prompt prefix is stored once per prompt.

  prefix_k, prefix_v: [B, K, P, Dh]  the prompts' keys/values from prefill, shared by the
                                      G = N // B rows b*G .. b*G+G-1 of prompt b
  k, v:               [N, K, R, Dh]  per-row slots for generated tokens
  Heads-major layout ([.., K, slots, Dh]) so attention reads the cache without a transpose
  on every step. All in the compute dtype.
  """
  prefix_k: jax.Array
  prefix_v: jax.Array
  k: jax.Array
  v: jax.Array


def _attention_weights(scores, mask):
  """Softmax over keys in f32; masked keys get exactly zero weight."""
  return jax.nn.softmax(jnp.where(mask, scores, _MASKED_SCORE), axis=-1)


def _dense_attention(q, k, v, mask):
  """q: [N, T, K, H/K, Dh] (scaled); k, v: [N, S, K, Dh]; mask: bool[N, T, S].
  Returns f32[N, T, K, H/K, Dh]."""
  probs = _attention_weights(einsum_f32("btkgd,bskd->bkgts", q, k), mask[:, None, None])
  return einsum_f32("bkgts,bskd->btkgd", probs.astype(q.dtype), v)


def in_query_blocks(attend, q, block: int):
  """attend(q, query_index) computed `block` queries at a time.

  q: [N, T, ...]; attend(q_block [N, b, ...], query_index int32[b]) -> [N, b, ...] builds
  whatever masks it needs from the queries' indices. Blocks run one after another
  (jax.lax.map) and each block's intermediate scores are recomputed in the backward pass
  (jax.checkpoint), so the live scores are [block, keys], never [T, keys]. Queries are
  padded up to a multiple of block (indices >= T; their outputs are dropped).
  Returns attend's [N, T, ...]."""
  t = q.shape[1]
  if not block or block >= t:
    return attend(q, jnp.arange(t))
  n = -(-t // block)
  q_blocks = jnp.pad(q, [(0, 0), (0, n * block - t)] + [(0, 0)] * (q.ndim - 2))
  q_blocks = jnp.moveaxis(q_blocks.reshape((q.shape[0], n, block) + q.shape[2:]), 1, 0)
  index_blocks = jnp.arange(n * block).reshape(n, block)
  out = jax.lax.map(jax.checkpoint(lambda args: attend(*args)),
                    (q_blocks, index_blocks))  # [n, N, block, ...]
  out = jnp.moveaxis(out, 0, 1)
  return out.reshape((out.shape[0], n * block) + out.shape[3:])[:, :t]


def _prefix_scores_and_mask(q, cache: LayerCache, prefix_mask):
  """The prompt-prefix part shared by both decode-time attentions: scores f32[N, K, H/K,
  T, P] of q [N, T, K, H/K, Dh] against each row's prompt keys (stored once per prompt,
  rows b*G .. b*G+G-1 share prompt b), and their mask bool[N, T, P]."""
  (b, p), (n, t, kv_heads, groups, hd) = prefix_mask.shape, q.shape
  q_by_prompt = q.reshape(b, n // b, t, kv_heads, groups, hd)
  scores = einsum_f32("bjtkgd,bksd->bjkgts", q_by_prompt, cache.prefix_k)
  mask = jnp.broadcast_to(jnp.repeat(prefix_mask, n // b, axis=0)[:, None, :], (n, t, p))
  return scores.reshape(n, kv_heads, groups, t, p), mask


def _prefix_output(prefix_probs, cache: LayerCache):
  """prefix_probs [N, K, H/K, T, P] times the prompts' values: f32[N, K, H/K, T, Dh]."""
  n, kv_heads, groups, t, p = prefix_probs.shape
  b = cache.prefix_v.shape[0]
  # Heads-major outputs ("...gtd"): with the other operand order XLA:CPU emits an unfused
  # bf16 x bf16 -> f32 dot it cannot run.
  return (einsum_f32("bjkgts,bksd->bjkgtd",
                     prefix_probs.reshape(b, n // b, kv_heads, groups, t, p), cache.prefix_v)
          .reshape(n, kv_heads, groups, t, cache.prefix_v.shape[-1]))


def _attend_with_shared_prefix(q, k, v, cache: LayerCache, mask):
  """Decode-time attention: shared prompt prefix + filled response slots + the new tokens.

  q: [N, T, K, H/K, Dh] (scaled); k, v: [N, T, K, Dh] the new tokens' keys/values;
  mask = (prefix_mask bool[B, P], filled_slots bool[R], causal bool[T, T]).
  Returns out f32[N, T, K, H/K, Dh]. One softmax spans all three key sets. The cache is
  only read here: the caller writes the new keys afterwards (write_decode_cache); this is
  the scanned layers' path (the unscanned one writes first, _attend_prefix_and_slots).
  """
  prefix_mask, filled_slots, causal = mask
  n, t = q.shape[:2]
  p, r = prefix_mask.shape[1], cache.k.shape[2]
  prefix_scores, prefix_visible = _prefix_scores_and_mask(q, cache, prefix_mask)
  scores = jnp.concatenate([
      prefix_scores,
      einsum_f32("btkgd,bksd->bkgts", q, cache.k),
      einsum_f32("btkgd,bskd->bkgts", q, k)], axis=-1)
  full_mask = jnp.concatenate([
      prefix_visible,
      jnp.broadcast_to(filled_slots[None, None, :], (n, t, r)),
      jnp.broadcast_to(causal[None], (n,) + causal.shape)], axis=-1)
  probs = _attention_weights(scores, full_mask[:, None, None]).astype(q.dtype)
  out = (_prefix_output(probs[..., :p], cache)
         + einsum_f32("bkgts,bksd->bkgtd", probs[..., p:p + r], cache.v)
         + einsum_f32("bkgts,bskd->bkgtd", probs[..., p + r:], v))
  return out.transpose(0, 3, 1, 2, 4)


def _attend_prefix_and_slots(q, cache: LayerCache, mask):
  """Decode-time attention over the shared prompt prefix and the response slots, which
  already hold this call's keys (written in place before attention).

  q: [N, T, K, H/K, Dh] (scaled); mask = (prefix_mask bool[B, P], visible bool[T, R]:
  slot s is visible to query t when it was filled before, or holds query t's own token or
  an earlier one of this call). Returns out f32[N, T, K, H/K, Dh]. One softmax spans both
  key sets."""
  prefix_mask, visible = mask
  n, t = q.shape[:2]
  p, r = prefix_mask.shape[1], cache.k.shape[2]
  prefix_scores, prefix_visible = _prefix_scores_and_mask(q, cache, prefix_mask)
  scores = jnp.concatenate([
      prefix_scores, einsum_f32("btkgd,bksd->bkgts", q, cache.k)], axis=-1)
  full_mask = jnp.concatenate([
      prefix_visible, jnp.broadcast_to(visible[None], (n, t, r))], axis=-1)
  probs = _attention_weights(scores, full_mask[:, None, None]).astype(q.dtype)
  out = (_prefix_output(probs[..., :p], cache)
         + einsum_f32("bkgts,bksd->bkgtd", probs[..., p:], cache.v))
  return out.transpose(0, 3, 1, 2, 4)


@jax.custom_batching.custom_vmap
def _update_slots(slots, new, write_index):
  return jax.lax.dynamic_update_slice_in_dim(slots, new, write_index, axis=slots.ndim - 2)


@_update_slots.def_vmap
def _update_slots_vmap(axis_size, in_batched, slots, new, write_index):
  """Under vmap (e.g. over stacked experts) with one write index for all: still a
  dynamic_update_slice over the batched slots, not jax's default scatter (which XLA:CPU
  does by copying the whole cache every decode step)."""
  slots_b, new_b, index_b = in_batched
  if index_b:  # a write index per batch element: the general scatter
    return jax.vmap(jax.lax.dynamic_update_slice_in_dim, in_axes=(0, 0, 0, None))(
        slots if slots_b else jnp.broadcast_to(slots, (axis_size,) + slots.shape),
        new if new_b else jnp.broadcast_to(new, (axis_size,) + new.shape),
        write_index, slots.ndim - 2 + slots_b), True
  slots = slots if slots_b else jnp.broadcast_to(slots, (axis_size,) + slots.shape)
  new = new if new_b else jnp.broadcast_to(new, (axis_size,) + new.shape)
  return _update_slots(slots, new, write_index), True


def write_slots(slots, new, write_index):
  """slots [..., K, R, Dh] with new [..., K, T, Dh] stored at slots write_index ..
  write_index+T-1: a dynamic_update_slice, in place when the old slots are not read
  again, also under jax.vmap with one write index (_update_slots_vmap)."""
  return _update_slots(slots, new.astype(slots.dtype), jnp.asarray(write_index, jnp.int32))


def _splash_attention(q, k, v, cache: LayerCache | None, mask, block: int):
  """Attention through the Pallas splash kernel (kernels/attention.py), the same values as
  the xla paths: causal self-attention over a key mask (cache None, mask bool[N, T]), or
  teacher forcing after a shared prompt (a cache with no response slots; mask =
  (prefix_mask bool[B, P], _)): each row's queries see its prompt's valid keys and its own
  keys causally. q: [N, T, K, H/K, Dh] (scaled); k, v: [N, T, K, Dh]."""
  if cache is None:
    return attention_kernels.splash_attention(q, k, v, mask, mask, block=block)
  prefix_mask = mask[0]
  g = q.shape[0] // prefix_mask.shape[0]
  per_row = lambda x: jnp.repeat(x, g, axis=0).transpose(0, 2, 1, 3)  # noqa: E731 [N, P, K, Dh]
  keys = jnp.concatenate([per_row(cache.prefix_k), k], axis=1)
  values = jnp.concatenate([per_row(cache.prefix_v), v], axis=1)
  # The continuation has no key mask (see forward_hidden_shared_prefix).
  row_valid = jnp.ones(q.shape[:2], bool)
  key_valid = jnp.concatenate([jnp.repeat(prefix_mask, g, axis=0), row_valid], axis=1)
  return attention_kernels.splash_attention(q, keys, values, row_valid, key_valid,
                                            prefix_len=prefix_mask.shape[1], block=block)
