"""Device mesh, logical-axis sharding rules, placement, and programs jitted on the mesh with
explicit shardings (MeshProgram; the sampler and the update are each one such program).

One code path runs on 1 CPU device (a mesh of size 1), on 8 simulated devices and on a pod
slice:

    run = RunSharding.from_config(spec.mesh.sizes(), param_axes=...)  # expert, data, fsdp, tensor
    params = run.shard_params(params)                # stacked [S, ...] -> expert x fsdp/tensor
    fn = rl.update.UpdateFn(run, ucfg, optimizer)     # the update's statics, bound once
    state, metrics = rl.update.update(fn, state, rows, teachers)

Mesh axes
---------
`expert`: the branch axis. Every stacked pytree (params, optimizer state, rollout rows,
metrics) has a leading expert axis S that is sharded over it: branch k lives on its own
group of devices. Inside a branch, `fsdp` shards parameters (ZeRO-3 style, gathered per
layer by XLA) and, with `data`, the batch of rows; `tensor` shards heads, MLP width and
vocabulary. "Tokens move, parameters don't": the only traffic across `expert` is the
teacher-scoring regroup of int token ids / masks / frames and the per-token log-probs
coming back (see `collectives_crossing_axis`, which checks a compiled step for this).

Logical axes (MaxText style)
----------------------------
Each array dimension gets a logical name, and LOGICAL_AXIS_RULES map logical names to mesh
axes. A parameter's names are declared by the layer that creates it (flax partitioning
metadata, see copd_jax.models.layers); the model's `param_axes(cfg)` collects them
({path: axes}) and RunSharding(mesh, param_axes=...) looks every leaf up there
(`param_logical_axes`). A parameter without a declaration is an error naming it.
`logical_to_spec` DROPS a mesh axis whose size does not divide the dimension (the
dimension is then replicated over that axis) instead of failing, so the same rules shard
a 4B model and a 32-wide test model; a tuple rule such as batch ->
(data, fsdp) keeps the longest prefix of its axes whose product divides the dimension.
A mesh axis is used at most once per array (later dimensions skip an axis already taken).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from copd_jax.models import lora

MESH_AXES = ("expert", "data", "fsdp", "tensor")


# logical axis -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("expert", "expert"),           # stacked branches / teachers
    ("batch", ("data", "fsdp")),    # rollout rows, prompts
    # Rows in the teacher-scoring exchange buffer: spread over every device of an expert
    # group (tensor too, where rows are otherwise replicated), so each device sends
    # only its own share across `expert`.
    ("exchange_rows", ("data", "fsdp", "tensor")),
    ("length", None),               # sequence positions
    ("embed", "fsdp"),              # d_model of weights (FSDP shards it)
    ("mlp", "tensor"),              # SwiGLU width
    ("heads", "tensor"),            # H * head_dim of q / o projections
    ("kv_heads", "tensor"),         # K * head_dim of k / v projections
    ("vocab", "tensor"),            # embedding rows / LM-head columns
    ("norm", None),                 # RMSNorm scales [D]
    ("head_dim", None),             # q_norm / k_norm scales [Dh]
    ("layers", None),               # the stacked layer axis of scanned layers
    ("lora_rank", None),            # the rank r of LoRA adapters (copd_jax.models.lora)
    # Vision towers (the toy ViT, Qwen3-VL's): sharded like the decoder, with names of
    # their own so a config can treat them differently.
    ("vision_embed", "fsdp"),       # ViT width of weights
    ("vision_heads", "tensor"),     # ViT attention (qkv / proj) width
    ("vision_mlp", "tensor"),       # ViT MLP and patch-merger hidden width
    ("vision_patch", None),         # flattened pixels of a patch (patch_embed input)
    ("vision_positions", None),     # learned position-embedding rows
    ("frames", None), ("image", None), ("channels", None),
)


def check_mesh_config(mesh_cfg: Mapping[str, int], num_branches: int | None = None) -> dict:
  """The checks that need no device count: known axes, sizes positive or -1 (at most one),
  a fixed `expert` size dividing num_branches. Returns the sizes (-1 kept)."""
  sizes = _mesh_sizes(mesh_cfg)
  if num_branches is not None and sizes["expert"] > 0 and num_branches % sizes["expert"]:
    raise ValueError(f"config.mesh.expert={sizes['expert']} must divide the number of "
                     f"branches ({num_branches})")
  return sizes


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int,
               num_branches: int | None = None) -> dict[str, int]:
  """Sizes of MESH_AXES with the one -1 resolved to the devices left over.

  mesh_cfg: {expert, data, fsdp, tensor} -> positive int or -1 (at most one -1).
  Raises ValueError naming config.mesh.<axis> when a size is invalid, the sizes do not
  multiply to num_devices, or `expert` does not divide num_branches.
  """
  sizes = _mesh_sizes(mesh_cfg)
  free = [a for a in MESH_AXES if sizes[a] == -1]
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh.{free[0]}=-1: the other axes multiply to {fixed}, which "
                       f"does not divide the {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"config.mesh sizes {sizes} multiply to {fixed}, but there are "
                     f"{num_devices} devices")
  if num_branches is not None and num_branches % sizes["expert"]:
    raise ValueError(f"config.mesh.expert={sizes['expert']} must divide the number of "
                     f"branches ({num_branches})")
  return sizes


def _mesh_sizes(mesh_cfg) -> dict[str, int]:
  cfg = dict(mesh_cfg.items() if hasattr(mesh_cfg, "items") else mesh_cfg)
  unknown = sorted(set(cfg) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; the axes are {MESH_AXES}")
  sizes = {}
  for axis in MESH_AXES:
    value = cfg.get(axis, 1)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
        (value <= 0 and value != -1):
      raise ValueError(f"config.mesh.{axis} must be a positive integer or -1 (= the devices "
                       f"left over), got {value!r}")
    sizes[axis] = int(value)
  free = [a for a in MESH_AXES if sizes[a] == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
  return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None,
              num_branches: int | None = None) -> Mesh:
  """A Mesh over `devices` (default: jax.devices(), the GLOBAL list in multi-process runs)
  with axes MESH_AXES. Auto axis types (not jax.make_mesh's Explicit default), so XLA
  propagates shardings from the jit in/out shardings."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices), num_branches)
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:  # physical-topology-aware order on TPU; a plain reshape elsewhere
    grid = jax.experimental.mesh_utils.create_device_mesh(
        shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


ParamAxes = Mapping[tuple[str, ...], tuple[str | None, ...]]


def leaf_names(path) -> tuple[str, ...]:
  """A jax key path -> its dict keys / attribute names (sequence indices are skipped)."""
  names = []
  for k in path:
    for attr in ("key", "name"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  return tuple(names)


class UndeclaredParameterError(ValueError):
  """A parameter (or optimizer-state leaf) whose logical axes no layer declared."""


def param_logical_axes(path, ndim: int, declared: ParamAxes,
                       stacked: bool = True) -> tuple[str | None, ...]:
  """Logical axis names of one parameter leaf (path: a jax key path): the axes its layer
  declared (`declared`: {path: axes}, e.g. decoder.param_axes(cfg)), behind a leading
  `expert` axis when stacked. A path without a declaration, or whose declaration does not
  fit its shape, raises UndeclaredParameterError naming it: never a silently replicated
  array."""
  return _declared_axes_of(leaf_names(path), ndim, declared, stacked)


def _declared_axes_of(names: tuple[str, ...], ndim: int, declared: ParamAxes,
                      stacked: bool) -> tuple[str | None, ...]:
  lead = ("expert",) if stacked else ()
  if names not in declared:
    raise UndeclaredParameterError(
        f"parameter {'/'.join(names)} (ndim {ndim}) has no declared logical axes: create it "
        "in a layer with nn.with_logical_partitioning (copd_jax.models.layers.Linear(..., "
        "axes=...)), and build the RunSharding with the model's param_axes")
  axes = lead + tuple(declared[names])
  if len(axes) != ndim:
    raise UndeclaredParameterError(
        f"parameter {'/'.join(names)} has {ndim} dimensions but its declared logical axes "
        f"are {axes} (a stacked/unrolled layer layout that does not match the model's?)")
  return axes


def opt_state_logical_axes(path, ndim: int, declared: ParamAxes,
                           stacked: bool = True) -> tuple[str | None, ...]:
  """Logical axes of an optimizer-state leaf. optax mirrors the params inside its state
  (e.g. adam's mu/nu): a leaf whose path ENDS with a parameter's path takes that
  parameter's axes. Leaves with no dimension but the expert axis (e.g. the step `count`,
  [S] when stacked) are per branch. Anything else raises UndeclaredParameterError."""
  names = leaf_names(path)
  for start in range(len(names)):  # the longest suffix first
    if names[start:] in declared:
      return _declared_axes_of(names[start:], ndim, declared, stacked)
  lead = ("expert",) if stacked else ()
  if ndim <= len(lead):
    return lead[:ndim]
  raise UndeclaredParameterError(
      f"optimizer-state leaf {'/'.join(names)} (ndim {ndim}) mirrors no declared parameter")


def _rule_table(rules) -> dict:
  table = {}
  for name, target in rules:
    table[name] = target
  return table


def logical_to_spec(axes: Sequence[str | None], rules=LOGICAL_AXIS_RULES,
                    mesh: Mesh | None = None, shape: Sequence[int] | None = None
                    ) -> PartitionSpec:
  """Logical axis names -> PartitionSpec under `rules`.

  With `mesh` and `shape`, a mesh axis whose size does not divide its dimension is dropped
  (that dimension is replicated over it): tiny test models shard as cleanly as big ones.
  Unknown logical names raise ValueError.
  """
  table = _rule_table(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    target = table[name]
    targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    kept, product = [], 1
    for mesh_axis in targets:
      if mesh_axis in used:
        continue
      size = mesh.shape[mesh_axis] if mesh is not None else 1
      if shape is not None and mesh is not None and shape[i] % (product * size):
        break  # keep the longest prefix that divides
      kept.append(mesh_axis)
      product *= size
    used.update(kept)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def put_global(host_tree, sharding_tree):
  """Global jax.Arrays from host numpy: each process materialises only its addressable
  shards (jax.make_array_from_callback), so in a multi-process run every process passes
  the SAME full host arrays. sharding_tree: a sharding per leaf (or a prefix)."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, host_tree, _broadcast_prefix(sharding_tree, host_tree))


def to_host(tree):
  """numpy copies of (possibly not fully addressable) global arrays; other leaves (numpy,
  process-local arrays) are copied as they are."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree.map(one, tree)


def _broadcast_prefix(prefix_tree, full_tree):
  """A sharding tree that is a prefix of full_tree, expanded to one sharding per leaf."""
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  return jax.tree.map(lambda sh, sub: jax.tree.map(lambda _: sh, sub), prefix_tree, full_tree,
                      is_leaf=is_sharding)


@functools.lru_cache(maxsize=None)
def _resharder(sharding):
  return jax.jit(lambda x: x, out_shardings=sharding)


def _reshard(x, sharding):
  return _resharder(sharding)(x)


def place(tree, sharding_tree):
  """Puts every leaf on its sharding: numpy via put_global, device arrays with another
  sharding (or uncommitted) via device_put (single process; no copy where the layout is
  the same), committed arrays already in place untouched."""
  def one(x, sharding):
    if isinstance(x, jax.Array):
      # Committed, as a program's outputs are: jit keys its cache on whether an argument
      # is committed, so an uncommitted first input would compile a stage's program twice.
      if x.committed and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
      if x.is_fully_addressable and sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
      if not x.is_fully_addressable:
        # A global array on another layout: reshard on device (an identity jit; jit
        # itself refuses committed arguments whose sharding differs from in_shardings).
        return _reshard(x, sharding)
      # A process-local array (e.g. the base loaded by every process) onto a mesh that
      # spans processes: device_put cannot cross hosts, so go through host memory (every
      # process holds the same value).
    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])
  return jax.tree.map(one, tree, _broadcast_prefix(sharding_tree, tree))


@dataclasses.dataclass(frozen=True)
class MeshProgram:
  """One program on a run's mesh (every run has one; one device is a mesh of size 1):
  fn(*static, *args) jitted with explicit in/out shardings, which shardings(args) derives
  from the arguments' shapes -> (in_shardings, out_shardings), one per argument / output
  (prefix trees allowed).

  No cache of ours: fn is a module-level function, and jax's own caches give a jit of the
  same function with equal static arguments and shardings the program already traced and
  compiled (one compile per stage and kind of step).

  program(*args) places the arguments on their shardings first (host numpy -> global
  arrays, see `place`) and traces under jax.set_mesh(mesh): the Pallas kernels then run
  inside shard_map over a mesh of several devices (kernels/sharded.py), as XLA cannot
  partition a Mosaic kernel. program.lower(*args) lowers it with the same shardings; args
  may be jax.ShapeDtypeStruct (nothing is allocated)."""
  fn: Any
  static: tuple
  mesh: Mesh
  shardings: Any  # args (a tuple) -> (in_shardings, out_shardings)

  def _jitted(self, args):
    in_shardings, out_shardings = self.shardings(args)
    jitted = jax.jit(self.fn, static_argnums=tuple(range(len(self.static))),
                     in_shardings=in_shardings, out_shardings=out_shardings)
    return jitted, in_shardings

  def __call__(self, *args):
    jitted, in_shardings = self._jitted(args)
    args = place(args, in_shardings)
    with jax.set_mesh(self.mesh):
      return jitted(*self.static, *args)

  def lower(self, *args):
    jitted, _ = self._jitted(args)
    with jax.set_mesh(self.mesh):
      return jitted.lower(*self.static, *args)


@dataclasses.dataclass(eq=False)
class RunSharding:
  """Shardings of a run's pytrees on `mesh` under logical-axis `rules`. Built once per
  run; every run has one (a single device is a mesh of size 1, `one_device`), and the
  sampler and the update take it as a static argument of their one jitted program."""
  mesh: Mesh
  rules: tuple = LOGICAL_AXIS_RULES
  # {parameter path: logical axes} declared by the model's layers (decoder.param_axes,
  # qwen3_vl.param_axes, policy_setup.declared_param_axes); None: a mesh for rows only
  # (asking it for parameter shardings is an error).
  param_axes: ParamAxes | None = None

  @classmethod
  def from_config(cls, mesh_cfg, num_branches: int | None = None, devices=None,
                  param_axes: ParamAxes | None = None) -> "RunSharding":
    return cls(make_mesh(mesh_cfg, devices, num_branches), param_axes=param_axes)

  @classmethod
  def one_device(cls, param_axes: ParamAxes | None = None, device=None) -> "RunSharding":
    """A mesh of size 1 on `device` (default: this process's first local device)."""
    device = jax.local_devices()[0] if device is None else device
    return cls(make_mesh(dict.fromkeys(MESH_AXES, 1), [device]), param_axes=param_axes)

  # Equal by value: the mesh, the rules and the declared axes. A RunSharding is a static
  # argument of every jitted program, so two runs on the same mesh and model (a sweep in one
  # process, the tests) share compiled programs instead of retracing them per run.
  # Computed once: jit hashes its static arguments on every call.
  @functools.cached_property
  def _value(self) -> tuple:
    axes = None if self.param_axes is None else tuple(sorted(self.param_axes.items()))
    return (self.mesh, tuple(self.rules), axes)

  @functools.cached_property
  def _hash(self) -> int:
    return hash(self._value)

  def __eq__(self, other) -> bool:
    return isinstance(other, RunSharding) and (self is other or self._value == other._value)

  def __hash__(self) -> int:
    return self._hash

  @property
  def size(self) -> int:
    return int(self.mesh.devices.size)

  def _declared(self) -> ParamAxes:
    if self.param_axes is None:
      raise UndeclaredParameterError(
          "this RunSharding has no parameter axes: build it with "
          "param_axes=policy_setup.declared_param_axes(model_cfg)")
    # Plus the axes of the LoRA adapters any target projection may carry (and of their
    # optimizer state): named after their kernel's (lora.with_adapter_axes).
    return lora.with_adapter_axes(self.param_axes)

  # -- single arrays
  def named(self, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(self.mesh, logical_to_spec(axes, self.rules, self.mesh, shape))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def per_branch(self, shape: Sequence[int], batch_dims: int = 0) -> NamedSharding:
    """[S, (batch...) , ...]: expert on the leading axis, then `batch_dims` batch axes."""
    axes = ("expert",) + ("batch",) * batch_dims
    axes = axes + (None,) * (len(shape) - len(axes))
    return self.named(axes[:len(shape)], shape)

  # -- pytrees
  def stacked_params(self, params, stacked: bool = True):
    """NamedSharding per leaf of (abstract or real) params [S, ...] (stacked) or [...],
    from the axes the model's layers declared (param_axes)."""
    declared = self._declared()
    if lora.is_lora(params):  # the shared base unstacked; the adapters [S, ...] as declared
      return params.replace(base=self.stacked_params(params.base, stacked=False),
                            adapters=self.stacked_params(params.adapters, stacked))

    def one(path, x):
      return self.named(param_logical_axes(path, len(x.shape), declared, stacked), x.shape)
    return jax.tree_util.tree_map_with_path(one, params)

  def opt_state(self, opt_state, stacked: bool = True):
    """NamedSharding per leaf of an optimizer state: leaves that mirror a parameter (mu/nu)
    take its axes, per-branch scalars (count) shard over expert."""
    declared = self._declared()

    def one(path, x):
      return self.named(opt_state_logical_axes(path, len(x.shape), declared, stacked),
                        x.shape)
    return jax.tree_util.tree_map_with_path(one, opt_state)

  def shard_params(self, params, stacked: bool = True):
    return place(params, self.stacked_params(params, stacked))

  def rows(self, rows):
    """Shardings of rl.rows.Rows [S, R, ...]: expert x batch."""
    return jax.tree.map(lambda x: self.per_branch(x.shape, batch_dims=1), rows)

  def put_global(self, host_tree, sharding_tree):
    return put_global(host_tree, sharding_tree)

  def local_prompt_mask(self, shape: Sequence[int]) -> np.ndarray:
    """bool[S, B]: the prompts of a [S, B, ...] batch (sharded like the sampler's prompts,
    per_branch with one batch axis) that this process's devices hold."""
    shape = tuple(shape)
    mask = np.zeros(shape, bool)
    for index in self.per_branch(shape, 1).addressable_devices_indices_map(shape).values():
      mask[index] = True
    return mask

  def to_host(self, tree):
    return to_host(tree)

  def regroup_placement(self):
    """(exchange, compute) constraints for scoring_lib.score_by_teachers.

    exchange: an exchange buffer [A, B, C, ...] (students x teachers x rows before the
      all-to-all, teachers x students x rows after) has A on `expert` and its rows C
      spread over the expert group's devices, so swapping A and B is an all-to-all over
      `expert` that carries each device's own rows only.
    compute: teacher-side rows [J, N, ...] on expert x batch, like the students' rows."""
    def exchange(x):
      axes = ("expert", None, "exchange_rows") + (None,) * (x.ndim - 3)
      return jax.lax.with_sharding_constraint(x, self.named(axes, x.shape))

    def compute(x):
      return jax.lax.with_sharding_constraint(x, self.per_branch(x.shape, batch_dims=1))
    return exchange, compute

  def constrain_rows(self, x):
    """Rows [N, ...] of one branch, inside the update's vmap over branches (whose axis is
    `expert`, spmd_axis_name): N over the batch axes when they divide it, the rest
    replicated. Keeps each device's micro-batch rows its own."""
    batch = math.prod(self.mesh.shape[a] for a in ("data", "fsdp"))
    if batch == 1 or x.shape[0] % batch:
      return x
    spec = PartitionSpec(("data", "fsdp"), *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))
