"""The logical axes each parameter declares where it is created, read back from a model.

Layers create their parameters through `nn.with_logical_partitioning` (see
copd_jax.models.layers): an init then returns `nn.LogicallyPartitioned` boxes carrying
axis names, and layers under nn.scan get the scan's own `layers` name in front. The models'
init functions unbox (`unbox`), so checkpoints, optax and every caller see plain arrays;
`declared_axes` reads the names from an ABSTRACT boxed init (jax.eval_shape: nothing is
allocated) for copd_jax.sharding to map onto the mesh.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from copd_jax.models import lora
from copd_jax.sharding import leaf_names

ParamPath = tuple[str, ...]
LogicalAxes = tuple[str | None, ...]


class UndeclaredAxesError(ValueError):
  """A parameter was created without logical axis names (or with the wrong number)."""


# A jax key path -> its dict keys / attribute names (sequence indices are skipped).
path_names = leaf_names


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def unbox(tree):
  """Plain arrays from an init's boxed (partitioning-metadata) tree."""
  return nn.meta.unbox(tree)


def declared_axes(boxed_params) -> dict[ParamPath, LogicalAxes]:
  """{parameter path: its logical axis names} of a boxed (abstract or real) params tree.

  Raises UndeclaredAxesError naming every parameter created without names, or whose names
  do not match its number of dimensions."""
  axes, undeclared = {}, []
  flat = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=_is_box)[0]
  for path, leaf in flat:
    names = path_names(path)
    if not isinstance(leaf, nn.Partitioned):
      undeclared.append(f"{'/'.join(names)} {tuple(getattr(leaf, 'shape', ()))}")
      continue
    shape = tuple(leaf.value.shape)
    if len(leaf.names) != len(shape):
      undeclared.append(f"{'/'.join(names)} {shape} (declares {leaf.names})")
      continue
    axes[names] = tuple(leaf.names)
  if undeclared:
    raise UndeclaredAxesError(
        "parameters without declared logical axes (create them with "
        "nn.with_logical_partitioning, e.g. layers.Linear(..., axes=(...))): "
        + ", ".join(undeclared))
  return axes


def map_over_branches(fn, *args, spmd_axis_name: str | None = None):
  """fn over the leading branch axis S of args (pytrees [S, ...]; None allowed): vmapped
  with the branch axis on mesh axis `spmd_axis_name`, or, when the branches share every
  device, one branch after another (jax.lax.map).

  They share every device when a mesh of several devices is set (jax.set_mesh) and its
  `spmd_axis_name` axis has size 1 (e.g. a v5e or v6e slice, whose chip count is no
  multiple of the 3 branches: expert=1). Vmapped there, every device would hold the
  activations of all S branches at once (S times the memory, for the same work: each
  device computes every branch either way); in sequence, one branch's at a time."""
  mesh = jax.sharding.get_abstract_mesh()
  leaves = jax.tree_util.tree_leaves(tuple(lora.trainable(a) for a in args))
  shared = (spmd_axis_name is not None and mesh is not None and not mesh.empty
            and mesh.size > 1 and spmd_axis_name in mesh.axis_names
            and mesh.shape[spmd_axis_name] == 1 and leaves and leaves[0].shape[0] > 1)
  # LoRA branches (lora.LoraBranches): the shared base is not mapped over, only the
  # adapters are (lora.branch_axes).
  in_axes = tuple(lora.branch_axes(a) for a in args)
  if shared:
    return jax.lax.map(lambda branch: fn(*_rejoin(args, branch)),
                       tuple(lora.trainable(a) for a in args))
  return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=spmd_axis_name)(*args)


def _rejoin(args, mapped):
  """args with each argument's mapped part (lora.trainable) replaced by `mapped`'s."""
  return tuple(lora.with_trainable(a, m) if lora.is_lora(a) else m
               for a, m in zip(args, mapped))
