"""LoRA branches: every branch is a low-rank adapter on ONE shared, frozen base.

A LoRA run (config.model.lora.rank r > 0) holds its branches as `LoraBranches`:

    base      one model's params, no expert axis, frozen: no gradient, no optimizer state
    adapters  {path of a target projection: {"lora_a": f32[S, (L,) r, in],
                                             "lora_b": f32[S, (L,) out, r]}}
    scale     alpha / r (static)

Branch k computes every target projection as

    y = x @ W + scale * (x @ A_k^T) @ B_k^T        (W: the base kernel [in, out])

i.e. with the effective weight W + scale * (B_k A_k)^T, without ever forming it: the
projection runs the base matmul once on the rows of every branch (the base is not
vmapped, so XLA folds the branch axis into the rows) plus two thin matmuls through rank
r per branch. Materialising W + s B_k A_k per branch instead would cost a full [in, out]
weight (and its HBM traffic) per branch and per step -- S base-sized temporaries, which
is what LoRA branches are there to avoid. B starts at zero, so step 0 computes the base
(up to float rounding: XLA may fuse the base and low-rank matmuls into one dot).

How it plugs in (the single execution path of full fine-tuning, unchanged):
* the models' entry points turn a branch's `LoraBranches` (adapters without the S axis)
  into ordinary flax variables with `variables` / `model_params`: the base tree with
  "lora_a" and "lora_b" (= scale * B) added next to each target kernel;
  copd_jax.models.layers.Linear adds the low-rank term when they are present. Rank 0
  (plain params) is today's code path, bit for bit (nothing is added, nothing read).
* every jax.vmap over branches takes `branch_axes(tree)` as its in_axes (the base is
  unbatched: None), and `trainable(tree)` / `with_trainable` give the optimizer and
  jax.grad the adapters only.
* merging (`merge`) is in weight space: W + sum_k w_k scale B_k A_k -- NOT the product
  of the mean adapters, which is a different (and wrong) matrix -- and
  `merged_adapter` is the exact rank-(S*r) adapter of the same merge.

Why not a library: qwix (0.1.8, what tunix uses) applies LoRA by intercepting the
einsum / dot_general calls of a wrapped linen or nnx model and creates the adapters as
ordinary parameters inside each module's own params collection, next to the kernel.
Branches need the opposite layout -- the adapters as their own tree stacked over the
expert axis and vmapped, the base unstacked, shared and outside the optimizer -- and an
interception layer would sit inside every jitted program (sampler, scoring, update).
flax's LoRA layers (nnx.LoRA, nnx.LoRALinear) are nnx modules; our models are linen.
What is needed is small: two thin matmuls in Linear and the tree plumbing here.

Sharding (copd_jax.sharding.RunSharding.stacked_params): the base like today's
parameters, unstacked (FSDP / tensor over the whole slice); the adapters over the
`expert` axis on their leading branch axis and, inside a branch, with their in / out
dimensions named like the kernel's (ADAPTER_SHARDING; see that constant for the
measurement behind the choice). The base gets no `expert` axis: it is shared by every
branch on every device.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = Any

# The projections an adapter may target: name -> the module that holds it.
TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
DEFAULT_TARGETS = tuple(TARGETS)
# Parameter subtrees never adapted (a vision tower's own blocks).
_SKIPPED_ROOTS = ("visual",)

# How the adapters' inner dimensions shard inside a branch's devices: "like_base" (the
# kernel's in / out names: fsdp / tensor) or "replicated" (whole on every device of the
# branch). Both put the leading branch axis on `expert`. "like_base" because it is the
# cheaper in memory: on configs/pod_4b.py (v5p 4x4x12, expert 3 x fsdp 16 x tensor 4)
# with rank-16 adapters on every projection, a device holds 25.3 MB of adapters + 50.6 MB
# of their AdamW moments, against 132.1 MB + 264.2 MB replicated (5.2x; the shardings'
# shard shapes on the abstract TPU devices, `experiments/compile_lora_sharding.py
# --bytes_only`, nothing allocated; the base
# is 279.6 MB per device either way). The per-layer gather of a sharded adapter is r / in
# of its kernel's, noise next to the base's FSDP gathers. A deviceless compile of both
# (experiments/compile_lora_sharding.py --layers=2: the OPD update at 2 of the 36
# layers; experiments/results/tpu/lora_sharding_2layers.json) agrees: like_base 5.071 GB
# per device, replicated 5.105 GB (+33.9 MB: the replicated adapters and their AdamW
# moments as arguments and outputs; the temporaries are equal within 1.1 MB).
ADAPTER_SHARDING = "like_base"
LORA_RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """config.model.lora as a value: rank r (0 = full fine-tuning), alpha, targets."""
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank


def check_spec(rank, alpha, targets, prefix: str = "model.lora.") -> LoraSpec:
  """A validated LoraSpec; ValueError naming the config field otherwise."""
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
    raise ValueError(f"config.{prefix}rank must be an integer >= 0 (0 = full fine-tuning), "
                     f"got {rank!r}")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) \
      or not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"config.{prefix}alpha must be a finite number > 0, got {alpha!r}")
  if isinstance(targets, str):
    raise ValueError(f"config.{prefix}targets must be a list of projection names, got the "
                     f"string {targets!r}")
  targets = tuple(targets)
  unknown = [t for t in targets if t not in TARGETS]
  if unknown:
    raise ValueError(f"config.{prefix}targets has unknown target(s) {unknown}; known: "
                     f"{list(TARGETS)} (embeddings and the LM head are not adapted)")
  if rank and not targets:
    raise ValueError(f"config.{prefix}targets is empty but rank={rank} > 0")
  if len(set(targets)) != len(targets):
    raise ValueError(f"config.{prefix}targets repeats a name: {list(targets)}")
  return LoraSpec(int(rank), float(alpha), targets)


def spec_from_dict(fields) -> LoraSpec:
  """The LoraSpec of config.model.lora's fields, a plain mapping (None or absent fields:
  rank 0 / the defaults). config_lib.spec_of is its one caller: the run's spec carries the
  result as `spec.lora`."""
  fields = {} if fields is None else fields
  return check_spec(fields.get("rank", 0), fields.get("alpha", 16.0),
                    fields.get("targets", DEFAULT_TARGETS))


def spec_from_config(cfg) -> LoraSpec:
  """The LoraSpec of an ml_collections config (config.model.lora; absent = rank 0): for
  scripts and tests that hold a config, not a RunSpec."""
  return spec_from_dict(cfg.model.to_dict().get("lora", None))


def projection_dims(model_dims: dict) -> dict[str, tuple[int, int]]:
  """(in, out) of each target projection of a Qwen3 decoder of these sizes (keys of
  config.model: d_model, num_heads, num_kv_heads, head_dim, mlp_dim)."""
  d, h, k, hd, m = (int(model_dims[f]) for f in ("d_model", "num_heads", "num_kv_heads",
                                                  "head_dim", "mlp_dim"))
  return {"q_proj": (d, h * hd), "k_proj": (d, k * hd), "v_proj": (d, k * hd),
          "o_proj": (h * hd, d), "gate_proj": (d, m), "up_proj": (d, m), "down_proj": (m, d)}


def check_rank_fits(spec: LoraSpec, dims: dict[str, tuple[int, int]],
                    prefix: str = "model.lora.") -> None:
  """rank <= min(in, out) of every target projection, else ValueError naming it."""
  for target in spec.targets:
    if target in dims and spec.rank > min(dims[target]):
      raise ValueError(f"config.{prefix}rank={spec.rank} exceeds the smaller dimension "
                       f"{min(dims[target])} of {target} (in, out = {dims[target]})")


# --------------------------------------------------------------------------- the tree


@dataclasses.dataclass(frozen=True)
class LoraBranches:
  """Branches as one shared base plus adapters (see the module docstring). With the
  branch axis S on every adapter leaf this is a stack of branches; inside a vmap over
  branches (branch_axes) the adapters have no S axis and it is ONE branch.

  A pytree whose children are keyed like a dict ('base', 'adapters'; scale is static),
  so orbax saves it as {'base': .., 'adapters': ..} and restores it by the same paths."""
  base: Params
  adapters: Params
  scale: float

  def replace(self, **changes) -> "LoraBranches":
    return dataclasses.replace(self, **changes)


jax.tree_util.register_pytree_with_keys(
    LoraBranches,
    lambda t: (((jax.tree_util.DictKey("base"), t.base),
                (jax.tree_util.DictKey("adapters"), t.adapters)), t.scale),
    lambda scale, children: LoraBranches(children[0], children[1], scale),
    flatten_func=lambda t: ((t.base, t.adapters), t.scale))


def is_lora(tree) -> bool:
  return isinstance(tree, LoraBranches)


def branch_axes(tree):
  """vmap in_axes over branches for one argument: 0, or for LoraBranches the base
  unbatched (None) and the adapters on axis 0. None (no argument) stays None."""
  if tree is None:
    return None
  if is_lora(tree):
    return LoraBranches(base=None, adapters=0, scale=tree.scale)
  return 0


def trainable(tree):
  """What jax.grad and the optimizer see: the adapters of LoraBranches, else the tree."""
  return tree.adapters if is_lora(tree) else tree


def with_trainable(tree, new):
  """tree with its trainable part replaced by `new` (see trainable)."""
  return tree.replace(adapters=new) if is_lora(tree) else new


def _is_target_kernel(names: Sequence[str], targets: Iterable[str]) -> bool:
  return (len(names) >= 3 and names[-1] == "kernel" and names[-2] in targets
          and names[-3] == TARGETS.get(names[-2]) and names[0] not in _SKIPPED_ROOTS)


def _key_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def target_kernels(base: Params, targets: Iterable[str]) -> dict[tuple[str, ...], Any]:
  """{path of a target kernel: the kernel} (path without the final 'kernel')."""
  targets = tuple(targets)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
    names = _key_names(path)
    if _is_target_kernel(names, targets):
      out[names[:-1]] = leaf
  return out


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return out


def _flat_adapters(adapters: Params) -> dict[tuple[str, ...], dict]:
  """{projection path: {'lora_a': .., 'lora_b': ..}} of a nested adapter tree."""
  out = {}

  def walk(node, path):
    if "lora_a" in node:
      out[path] = node
      return
    for k, v in node.items():
      walk(v, path + (k,))
  walk(adapters, ())
  return out


def init_adapters(base: Params, spec: LoraSpec, num_branches: int, key) -> Params:
  """Fresh adapters of `num_branches` branches for `base` (one model's params, unrolled
  or scanned layers): A f32[S, (L,) r, in] uniform in +-1/sqrt(in) (PEFT's kaiming
  uniform with a = sqrt(5)), B f32[S, (L,) out, r] zero, so every branch starts AT the
  base. Raises ValueError when the rank exceeds a target's smaller dimension or no
  target projection exists in base."""
  if not spec.enabled:
    raise ValueError("init_adapters needs a LoRA rank > 0")
  kernels = target_kernels(base, spec.targets)
  if not kernels:
    raise ValueError(f"no projection of the model matches config.model.lora.targets="
                     f"{list(spec.targets)}")
  flat = {}
  for i, (path, kernel) in enumerate(sorted(kernels.items())):
    *lead, d_in, d_out = kernel.shape
    if spec.rank > min(d_in, d_out):
      raise ValueError(f"config.model.lora.rank={spec.rank} exceeds the smaller dimension "
                       f"{min(d_in, d_out)} of {'/'.join(path)} (in, out = {d_in}, {d_out})")
    bound = 1.0 / np.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (num_branches, *lead, spec.rank, d_in),
                           jnp.float32, -bound, bound)
    b = jnp.zeros((num_branches, *lead, d_out, spec.rank), jnp.float32)
    flat[path] = {"lora_a": a, "lora_b": b}
  return _nest(flat)


def init_branches(base: Params, spec: LoraSpec, num_branches: int, key) -> LoraBranches:
  """S LoRA branches on `base`, each starting at the base (B = 0)."""
  return LoraBranches(base=base, adapters=init_adapters(base, spec, num_branches, key),
                      scale=spec.scale)


# --------------------------------------------------------------- one branch -> a model


def model_params(params):
  """ONE branch's params as the model's flax params: plain params as they are; for
  LoraBranches (adapters without the branch axis) the base with 'lora_a' (A) and
  'lora_b' (scale * B) next to each target kernel, which layers.Linear adds as
  x @ W + (x @ A^T) @ (scale B)^T. Gradients reach A and B through this tree."""
  if not is_lora(params):
    return params
  scale = params.scale

  def attach(base_node, adapter_node):
    if "lora_a" in adapter_node:
      return dict(base_node, lora_a=adapter_node["lora_a"],
                  lora_b=adapter_node["lora_b"] * scale)
    out = dict(base_node)
    for name, child in adapter_node.items():
      if name not in base_node:
        raise ValueError(f"adapter entry {name!r} has no counterpart in the base params")
      out[name] = attach(base_node[name], child)
    return out
  return attach(params.base, params.adapters)


def variables(params) -> dict:
  """{'params': model_params(params)}: what Module.apply takes."""
  return {"params": model_params(params)}


def _delta(a, b, scale):
  """scale * (B A)^T, the kernel-layout [.., in, out] delta of one adapter:
  a [.., r, in], b [.., out, r] (f32, HIGHEST precision)."""
  return scale * jnp.einsum("...ri,...or->...io", a, b, precision=jax.lax.Precision.HIGHEST)


def effective_params(params: LoraBranches) -> Params:
  """ONE branch's full weights (W + scale B A on every target kernel): plain params, as
  an export or a full-fine-tuning run would hold them."""
  flat = {path: node for path, node in _flat_adapters(params.adapters).items()}

  def add(path, leaf):
    names = _key_names(path)
    node = flat.get(names[:-1]) if names[-1] == "kernel" else None
    if node is None:
      return leaf
    return leaf + _delta(node["lora_a"], node["lora_b"], params.scale).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(add, params.base)


def num_branches(params: LoraBranches) -> int:
  sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(params.adapters)}
  if len(sizes) != 1:
    raise ValueError(f"LoRA adapters must share one leading branch axis, got sizes {sizes}")
  return int(sizes.pop())


def take_branch(params: LoraBranches, k) -> LoraBranches:
  """Branch k (adapters without the branch axis; still LoraBranches)."""
  return params.replace(adapters=jax.tree.map(lambda x: x[k], params.adapters))


def merge(params: LoraBranches, weights) -> Params:
  """The merged model in weight space: W + sum_k w_k * scale * B_k A_k on every target
  kernel (weights f32[S], normalised). This is the average of the branches' effective
  weights -- not W + scale * mean(B) mean(A). Returns plain single-model params."""
  w = jnp.asarray(weights, jnp.float32)
  flat = _flat_adapters(params.adapters)

  def add(path, leaf):
    names = _key_names(path)
    node = flat.get(names[:-1]) if names[-1] == "kernel" else None
    if node is None:
      return leaf.astype(jnp.float32)
    deltas = jax.vmap(lambda a, b: _delta(a, b, params.scale))(node["lora_a"], node["lora_b"])
    return leaf.astype(jnp.float32) + jnp.tensordot(w, deltas, axes=1,
                                                    precision=jax.lax.Precision.HIGHEST)
  return jax.tree_util.tree_map_with_path(add, params.base)


def merged_adapter(params: LoraBranches, weights) -> LoraBranches:
  """The exact merge as ONE adapter of rank S*r (a one-branch LoraBranches, same scale):
  A = [A_1; ..; A_S] (stacked along the rank), B = [w_1 B_1, .., w_S B_S], so that
  scale * B A = sum_k w_k scale B_k A_k exactly (in real arithmetic). For a PEFT-style
  adapter file, its alpha is scale * S * r."""
  w = jnp.asarray(weights, jnp.float32)

  def one(node):
    a, b = node["lora_a"], node["lora_b"]  # [S, .., r, in], [S, .., out, r]
    s = a.shape[0]
    a_cat = jnp.concatenate([a[k] for k in range(s)], axis=-2)
    b_cat = jnp.concatenate([w[k] * b[k] for k in range(s)], axis=-1)
    return {"lora_a": a_cat[None], "lora_b": b_cat[None]}
  flat = {path: one(node) for path, node in _flat_adapters(params.adapters).items()}
  return params.replace(adapters=_nest(flat))


def append_base(params: LoraBranches) -> LoraBranches:
  """The branches plus the base itself as one more branch (zero adapters)."""
  return params.replace(adapters=jax.tree.map(
      lambda x: jnp.concatenate([x, jnp.zeros_like(x[:1])]), params.adapters))


# ------------------------------------------------------------------------- sharding


def with_adapter_axes(declared: dict) -> dict:
  """The model's {parameter path: logical axes} plus the axes of every possible adapter
  leaf (lora_a [.., r, in], lora_b [.., out, r] next to each target kernel), so that
  RunSharding shards adapters and their optimizer state by the same lookup."""
  out = dict(declared)
  for path, axes in declared.items():
    if not _is_target_kernel(path, TARGETS):
      continue
    *lead, d_in, d_out = axes
    if ADAPTER_SHARDING == "replicated":
      d_in = d_out = None
    out[path[:-1] + ("lora_a",)] = (*lead, LORA_RANK_AXIS, d_in)
    out[path[:-1] + ("lora_b",)] = (*lead, d_out, LORA_RANK_AXIS)
  return out


def adapter_bytes_per_branch(base_shapes: Params, spec: LoraSpec) -> int:
  """Bytes of one branch's f32 adapters for a base of these (abstract) shapes."""
  total = 0
  for kernel in target_kernels(base_shapes, spec.targets).values():
    *lead, d_in, d_out = kernel.shape
    total += int(np.prod(lead, dtype=np.int64)) * spec.rank * (d_in + d_out) * 4
  return total
