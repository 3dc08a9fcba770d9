"""Pallas kernels on a mesh of more than one device: each call inside `jax.shard_map`.

XLA cannot partition a Mosaic (Pallas TPU) kernel ("Mosaic kernels cannot be
automatically partitioned. Please wrap the call in a shard_map"), so on a multi-device
mesh the ops call their kernels through `rows_over_mesh`: the rows (tokens, batch) are
split over every mesh axis that is still free, each device runs the kernel on its own
rows, and arrays without a row axis enter whole (replicated; the compiler all-gathers a
sharded one, and shard_map's transpose sums its gradient over the devices). Splash
attention splits its kv heads over `tensor` as well (attention.py).

The LM head of the per-token statistics (log-prob, entropy: the policy loss and teacher
scoring) is vocabulary-parallel instead (`vocab_parallel_stats`): a whole f32 head is
D x V x 4 bytes (1.56 GB for Qwen3-4B, per branch), and gathering it on every device,
with its whole gradient, took several GiB per device on a pod. Each device keeps its
`tensor` share of the vocabulary columns and the rows of its other axes; the kernel's
per-shard log-sum-exp and entropy combine across `tensor` exactly (a log-sum-exp of
the shards' log-sum-exps) and only [rows] vectors cross devices.

Which mesh: the one set by `jax.set_mesh` (the run's programs trace under it,
and so does the deviceless TPU compile); no mesh, or a mesh of one device, calls the
kernel directly (the single-device path is unchanged). Which axes are free: not manual
already (inside another shard_map, e.g. kernels/tpu_check.py) and not the
`spmd_axis_name` of an enclosing vmap (the update vmaps its branches over `expert`:
shard_map's batching rule then puts the branch axis on `expert` itself).

check_vma=False: the kernels' out_shapes carry no varying-axes annotation. Its transpose
rule sums the cotangent of a replicated input over the axes its spec does not name
(the head's gradient: a sum over every device's rows) and divides an output's cotangent
by the size of the axes its spec does not name; the row outputs here name every free
axis, so nothing is divided.

Rows are padded with zeros to a multiple of the free devices (padding rows give finite
values, are cut off after and get no gradient).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def active_mesh():
  """The abstract mesh set by jax.set_mesh when it has more than one device and some of
  its axes are not manual yet, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size <= 1 or not _open_axes(mesh):
    return None
  return mesh


def _spmd_axis_names() -> frozenset:
  """Mesh axes an enclosing vmap(spmd_axis_name=...) already maps (jax's axis env)."""
  from jax._src import core  # the axis env has no public accessor in jax 0.10
  return frozenset(core.get_axis_env().spmd_axis_names)


def free_axes(mesh) -> tuple[str, ...]:
  """Mesh axes of size > 1 that are neither manual already nor an enclosing vmap's
  spmd_axis_name: the axes a kernel's rows are split over, in mesh order."""
  taken = set(mesh.manual_axes) | _spmd_axis_names()
  return tuple(a for a in mesh.axis_names if a not in taken and mesh.shape[a] > 1)


def _open_axes(mesh) -> frozenset:
  """Every mesh axis not manual already: the shard_map's axis_names (the vmap's spmd
  axis included, as its batching rule puts the mapped dimension on it)."""
  return frozenset(a for a in mesh.axis_names if a not in set(mesh.manual_axes))


def _spec(axes: Sequence[str]):
  return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def _pad_rows(x, rows: int, fill=0):
  pad = rows - x.shape[0]
  if pad == 0:
    return x
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)


def rows_over_mesh(fn: Callable, row_args: Sequence, whole_args: Sequence = (), *,
                   row_axes: Sequence[str] | None = None, row_specs: Sequence = None,
                   out_spec: tuple = (), pad_values: Sequence | None = None):
  """fn(*row_args, *whole_args) computed per device on its rows.

  row_args: arrays [N, ...] split over `row_axes` on axis 0 (default: every free axis);
  whole_args: arrays given whole to every device; fn returns a pytree of arrays [N, ...].
  row_specs: per row arg, the spec of its dimensions after the first (default none, e.g.
  ((None, "tensor"),) for heads over `tensor` on axis 2); out_spec: the same for every
  output. pad_values: the fill of each row arg's padding rows (default 0).
  No active mesh: fn(*row_args, *whole_args) directly.
  """
  mesh = active_mesh()
  if mesh is None:
    return fn(*row_args, *whole_args)
  axes = tuple(free_axes(mesh) if row_axes is None else row_axes)
  n = row_args[0].shape[0]
  shards = math.prod(mesh.shape[a] for a in axes)
  padded = -(-n // shards) * shards
  fills = pad_values or (0,) * len(row_args)
  row_args = [_pad_rows(x, padded, f) for x, f in zip(row_args, fills)]
  row_spec = _spec(axes)
  extras = row_specs or ((),) * len(row_args)
  in_specs = tuple(P(row_spec, *extra) for extra in extras) + (P(),) * len(whole_args)
  # out_specs is a prefix of fn's output tree: one spec for every output.
  out = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(row_spec, *out_spec),
                      axis_names=_open_axes(mesh), check_vma=False)(*row_args, *whole_args)
  return jax.tree.map(lambda x: x[:n], out)


def _stats_of_vocab_shard(kernel_fn: Callable, hidden, tokens, head, axis: str):
  """Per device, inside shard_map: (logprob f32[n], entropy f32[n]) over the FULL
  vocabulary from this device's columns head [D, V/t] (shard i of `axis` holds columns
  i*V/t ..) and the other shards' [n]-vectors.

  The kernel runs with target -1 (no column matches), so it returns -lse_i exactly and
  the shard's entropy H_i; the sampled token's logit comes from the shard that owns its
  column (a [n, D] x [n, D] row-wise product at full f32 precision, as the kernel's
  f32-accumulated tiles). With w_i = exp(lse_i - lse): lse = logsumexp_i lse_i, and
  sum_v p_v z_v = sum_i w_i (lse_i - H_i), so entropy = lse - that sum."""
  width = head.shape[1]
  local = tokens - jax.lax.axis_index(axis) * width
  owned = (local >= 0) & (local < width)
  minus_lse, shard_entropy = kernel_fn(hidden, jnp.full_like(tokens, -1), head)
  shard_lse = -minus_lse
  columns = jnp.take(head, jnp.clip(local, 0, width - 1), axis=1).T  # [n, D]
  logit = jnp.einsum("nd,nd->n", hidden, columns.astype(hidden.dtype),
                     preferred_element_type=jnp.float32,
                     precision=jax.lax.Precision.HIGHEST)
  target = jax.lax.psum(jnp.where(owned, logit, 0.0), axis)
  lse = jax.nn.logsumexp(jax.lax.all_gather(shard_lse, axis), axis=0)
  mean_logit = jax.lax.psum(jnp.exp(shard_lse - lse) * (shard_lse - shard_entropy), axis)
  return target - lse, lse - mean_logit


def vocab_parallel_stats(kernel_fn: Callable, hidden, tokens, head, *,
                         vocab_axis: str = "tensor"):
  """(logprob f32[N], entropy f32[N]) of kernel_fn(hidden [N, D], tokens int[N], head
  [D, V]) -> (logprob, entropy) (a Pallas per-token statistics kernel; a token outside
  [0, V) must match no column) on the active mesh with the head's columns split over
  `vocab_axis` (when it is free and divides V) and the rows over the other free axes.
  Otherwise: rows_over_mesh (whole head), or kernel_fn directly without a mesh."""
  mesh = active_mesh()
  if mesh is None:
    return kernel_fn(hidden, tokens, head)
  axes = free_axes(mesh)
  if vocab_axis not in axes or head.shape[1] % mesh.shape[vocab_axis]:
    return rows_over_mesh(kernel_fn, (hidden, tokens), (head,))
  row_axes = tuple(a for a in axes if a != vocab_axis)
  n = hidden.shape[0]
  shards = math.prod(mesh.shape[a] for a in row_axes)
  padded = -(-n // shards) * shards
  hidden, tokens = _pad_rows(hidden, padded), _pad_rows(tokens, padded)
  rows = P(_spec(row_axes))
  out = jax.shard_map(
      lambda h, t, w: _stats_of_vocab_shard(kernel_fn, h, t, w, vocab_axis), mesh=mesh,
      in_specs=(rows, rows, P(None, vocab_axis)), out_specs=rows,
      axis_names=_open_axes(mesh), check_vma=False)(hidden, tokens, head)
  return jax.tree.map(lambda x: x[:n], out)
