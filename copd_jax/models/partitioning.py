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
