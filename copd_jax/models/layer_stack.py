"""The two layouts of a decoder's layer parameters, and conversion between them.

Unrolled: `layers_{i}/...` (checkpoints and the Hugging Face importers and exporters).
Scanned (ModelConfig.scan_layers): `layers/...`, each leaf stacked on a leading layer axis
[L, ...] (after any leading axes, e.g. [S, L, ...] for stacked experts). Works for a Policy
and for a Qwen3-VL parameter tree; entries other than the layers are kept as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # a nested dict of arrays


def _layer_index(key) -> int | None:
  """i for a top-level key 'layers_{i}', else None."""
  prefix = "layers_"
  if isinstance(key, str) and key.startswith(prefix) and key[len(prefix):].isdigit():
    return int(key[len(prefix):])
  return None


def stack_layers(params: Params, leading_axes: int = 0) -> Params:
  """The unrolled layout (`layers_{i}/...`, as checkpoints and the HF importers have it)
  -> the scanned one (`layers/...`, each leaf stacked on a layer axis), for a Policy or a
  Qwen3-VL parameter tree. leading_axes: axes before the layer axis (1 for experts
  stacked [S, ...]: layer leaves become [S, L, ...]). Other entries are kept as they are.
  Raises ValueError when the layer indices are not 0 .. L-1 or the tree is already
  stacked."""
  indices = sorted(i for i in map(_layer_index, params) if i is not None)
  if "layers" in params:
    raise ValueError("stack_layers: the parameters are already stacked (they hold 'layers')")
  if indices != list(range(len(indices))) or not indices:
    raise ValueError(f"stack_layers: expected layers_0 .. layers_{{L-1}}, got layer indices "
                     f"{indices}")
  layers = [params[f"layers_{i}"] for i in indices]
  out = {k: v for k, v in params.items() if _layer_index(k) is None}
  def stack(*xs):  # host arrays stay on the host (an exporter's numpy tree)
    return (np if isinstance(xs[0], np.ndarray) else jnp).stack(xs, axis=leading_axes)
  out["layers"] = jax.tree.map(stack, *layers)
  return out


def unstack_layers(params: Params, leading_axes: int = 0) -> Params:
  """The inverse of stack_layers: `layers/...` [.., L, ...] -> `layers_{i}/...`."""
  if "layers" not in params:
    raise ValueError("unstack_layers: the parameters are not stacked (no 'layers' entry)")
  leaves = jax.tree_util.tree_leaves(params["layers"])
  num_layers = leaves[0].shape[leading_axes]
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    index = (slice(None),) * leading_axes + (i,)
    out[f"layers_{i}"] = jax.tree.map(lambda x, index=index: x[index], params["layers"])
  return out


def is_stacked(params: Params) -> bool:
  """True for the scanned layout (a `layers` entry), False for the unrolled one."""
  return "layers" in params


def to_layout(params: Params, scan_layers: bool, leading_axes: int = 0) -> Params:
  """params in the layout a model with this scan_layers setting takes (converted when the
  layout differs, as is otherwise)."""
  if scan_layers and not is_stacked(params):
    return stack_layers(params, leading_axes)
  if not scan_layers and is_stacked(params):
    return unstack_layers(params, leading_axes)
  return params
