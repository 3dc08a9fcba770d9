"""Device mesh, logical-axis sharding rules, and the sharded jitted update and sampler.

One code path runs on 1 CPU device, on 8 simulated devices and on a pod slice:

    mesh = make_mesh(cfg.mesh)                       # axes expert, data, fsdp, tensor
    run = RunSharding(mesh)
    params = run.shard_params(params)                # stacked [S, ...] -> expert x fsdp/tensor
    update = run.update_fn(ucfg, optimizer, distil=True, kl=False)
    params, opt_state, metrics = update(params, opt_state, teachers, rows, routing, None)

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
Each array dimension gets a logical name (`param_logical_axes`), and LOGICAL_AXIS_RULES map
logical names to mesh axes. `logical_to_spec` DROPS a mesh axis whose size does not divide
the dimension (the dimension is then replicated over that axis) instead of failing, so the
same rules shard a 4B model and a 32-wide test model; a tuple rule such as batch ->
(data, fsdp) keeps the longest prefix of its axes whose product divides the dimension.
A mesh axis is used at most once per array (later dimensions skip an axis already taken).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.experimental.mesh_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
    ("vision", None),               # the small vision tower: replicated inside a branch
    ("frames", None), ("image", None), ("channels", None),
)


# ------------------------------------------------------------------------------ mesh


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


# ------------------------------------------------------------------- logical axes


def _leaf_names(path) -> list[str]:
  names = []
  for k in path:
    for attr in ("key", "name"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  return names


def param_logical_axes(path, ndim: int, stacked: bool = True) -> tuple[str | None, ...]:
  """Logical axis names of one parameter (or optimizer-state) leaf, from its path.

  Qwen3 names (model.py docstring): embed_tokens/embedding [V, D] -> (vocab, embed);
  q_proj [D, H*Dh] -> (embed, heads); k/v_proj -> (embed, kv_heads); o_proj -> (heads,
  embed); gate/up_proj [D, M] -> (embed, mlp); down_proj -> (mlp, embed); lm_head [D, V]
  -> (embed, vocab); norms -> (norm,) / (head_dim,); the vision tower -> `vision`
  (replicated). With stacked=True a leading `expert` axis is added. Leaves whose names are
  not known (e.g. optax's `count`) get `expert` on the leading axis and None elsewhere.
  """
  names = _leaf_names(path)
  lead = ("expert",) if stacked else ()
  inner = ndim - len(lead)
  module = names[-2] if len(names) >= 2 else ""
  leaf = names[-1] if names else ""
  axes: tuple | None = None
  if "visual" in names:
    axes = ("vision",) * inner
  elif module == "embed_tokens" and leaf == "embedding":
    axes = ("vocab", "embed")
  elif module == "lm_head":
    axes = ("embed", "vocab")
  elif module == "q_proj":
    axes = ("embed", "heads")
  elif module in ("k_proj", "v_proj"):
    axes = ("embed", "kv_heads")
  elif module == "o_proj":
    axes = ("heads", "embed")
  elif module in ("gate_proj", "up_proj"):
    axes = ("embed", "mlp")
  elif module == "down_proj":
    axes = ("mlp", "embed")
  elif module in ("q_norm", "k_norm"):
    axes = ("head_dim",)
  elif leaf == "scale":
    axes = ("norm",)
  if axes is None or len(axes) != inner:
    axes = (None,) * max(inner, 0)  # unknown or scalar-per-branch leaf: replicated inside
  return (lead + tuple(axes))[:ndim] if ndim >= len(lead) else (None,) * ndim


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


# -------------------------------------------------------------------- host <-> device


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
  sharding via device_put (single process), arrays already in place untouched."""
  def one(x, sharding):
    if isinstance(x, jax.Array):
      if x.sharding.is_equivalent_to(sharding, x.ndim):
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


# -------------------------------------------------------------------- the run object


class ShardedFunction:
  """A jitted function whose in/out shardings are derived from its arguments' shapes; one
  compiled executable per distinct argument structure (so a stage compiles once).

  build(args) -> (fn, in_shardings, out_shardings), where fn takes the same args."""

  def __init__(self, build: Callable, name: str):
    self._build = build
    self._name = name
    self._cache: dict = {}

  def _jitted(self, args):
    key = tuple((jax.tree_util.tree_structure(a),
                 tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x))))
                       for x in jax.tree_util.tree_leaves(a))) for a in args)
    if key not in self._cache:
      fn, in_sh, out_sh = self._build(args)
      self._cache[key] = (jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), in_sh)
    return self._cache[key]

  def __call__(self, *args):
    jitted, in_sh = self._jitted(args)
    return jitted(*place(args, in_sh))

  def lower(self, *args):
    """Lowers with the derived shardings; args may be jax.ShapeDtypeStruct (nothing is
    allocated)."""
    jitted, _ = self._jitted(args)
    return jitted.lower(*args)

  @property
  def num_compiled(self) -> int:
    return len(self._cache)


@dataclasses.dataclass(eq=False)
class RunSharding:
  """Shardings of a run's pytrees on `mesh` under logical-axis `rules`, and the sharded
  jitted update and sampler. Built once per run; its functions are cached per stage."""
  mesh: Mesh
  rules: tuple = LOGICAL_AXIS_RULES

  def __post_init__(self):
    self._fns: dict = {}

  @classmethod
  def from_config(cls, mesh_cfg, num_branches: int | None = None, devices=None) -> "RunSharding":
    return cls(make_mesh(mesh_cfg, devices, num_branches))

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
    """NamedSharding per leaf of (abstract or real) params — or optimizer state, whose
    leaves carry the params' names (mu/nu) or are per-branch scalars (count)."""
    def one(path, x):
      return self.named(param_logical_axes(path, len(x.shape), stacked), x.shape)
    return jax.tree_util.tree_map_with_path(one, params)

  opt_state = stacked_params  # same naming rules; optax mirrors the params' paths

  def shard_params(self, params, stacked: bool = True):
    return place(params, self.stacked_params(params, stacked))

  def rows(self, rows):
    """Shardings of trainer.Rows [S, R, ...]: expert x batch."""
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
    """(exchange, compute) constraints for trainer.score_by_teachers.

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

  # -- jitted functions
  def update_fn(self, ucfg, optimizer, distil: bool, kl: bool,
                cross_row_start: int = 0, prompt_len: int = 0) -> ShardedFunction:
    """trainer.update with explicit shardings. Call as
    fn(params, opt_state, teacher_params, rows, routing, ref_params) (None where unused).
    cross_row_start: the number of native rows per student (they are never regrouped);
    prompt_len: the rows' prompt columns or 0 (trainer.score_by_teachers)."""
    key = ("update", ucfg, optimizer, distil, kl, cross_row_start, prompt_len)
    if key not in self._fns:
      from copd_jax import trainer  # trainer imports this module's users, not vice versa

      from copd_jax import model as model_lib

      def build(args):
        params, opt_state, teachers, rows, routing, ref = args
        def fn(p, o, t, r, rt, rf):
          with model_lib.activation_sharding(self.constrain_rows):
            return trainer.update_body(p, o, t, r, rt, rf, ucfg=ucfg, optimizer=optimizer,
                                       distil=distil, placement=self.regroup_placement(),
                                       cross_row_start=cross_row_start, prompt_len=prompt_len)
        p_sh = self.stacked_params(params)
        in_sh = (p_sh, self.opt_state(opt_state),
                 None if teachers is None else self.stacked_params(teachers), self.rows(rows),
                 None if routing is None else self.replicated,
                 None if ref is None else self.stacked_params(ref, stacked=False))
        s = jax.tree_util.tree_leaves(params)[0].shape[0]
        metrics_sh = self.per_branch((s,))
        return fn, in_sh, (p_sh, self.opt_state(opt_state), metrics_sh)
      self._fns[key] = ShardedFunction(build, "update")
    return self._fns[key]

  def generate_fn(self, model_cfg, sampling_cfg, num_samples: int) -> ShardedFunction:
    """sampling.stacked_generate with explicit shardings. Call as
    fn(params, prompt_tokens [S, B, P], prompt_mask, frames or None, key_data uint32[S, 2])
    -> Rollout [S, B, G, R] sharded expert x batch."""
    key = ("generate", model_cfg, sampling_cfg, num_samples)
    if key not in self._fns:
      from copd_jax import sampling

      def build(args):
        params, tokens, mask, frames, key_data = args
        def fn(p, tok, msk, frm, kd):
          return sampling.stacked_generate_body(p, model_cfg, tok, msk, frm,
                                                jax.random.wrap_key_data(kd), sampling_cfg,
                                                num_samples)
        in_sh = (self.stacked_params(params), self.per_branch(tokens.shape, 1),
                 self.per_branch(mask.shape, 1),
                 None if frames is None else self.per_branch(frames.shape, 1),
                 self.per_branch(key_data.shape))
        out_sh = self.per_branch(tuple(tokens.shape[:2]) + (num_samples, 1), 1)
        return fn, in_sh, out_sh
      self._fns[key] = ShardedFunction(build, "generate")
    return self._fns[key]


# ------------------------------------------------------------- HLO collective check

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
                "f8e4m3b11fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1}
_SHAPE_RE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True))
                       + r")\[([0-9,]*)\]")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast", "ragged-all-to-all")
_OP_RE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(([^)]*)\)")


def _shapes_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE_RE.findall(text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return total


def _iota_ids(dims: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
  ids = np.arange(math.prod(dims)).reshape(dims)
  return ids.transpose(perm) if perm else ids


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def _mesh_groups(line: str) -> list[list[int]] | None:
  """The `replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}` form (optionally with
  `device_ids=([dims]T(perm))` or `device_ids=(0,1,..)`): a mesh of devices and the axes a
  group spans. No axis set printed = one group spanning every axis (counted as crossing,
  the conservative reading)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]"
                r"(?:,\s*device_ids=\((?:\[[0-9,]*\](?:T\([0-9,]*\))?|[0-9,\s]*)\))?"
                r"(\s*\{([^}]*)\})?", line)
  if not m:
    return None
  names, sizes = [], []
  for part in m.group(1).split(","):
    pm = re.fullmatch(r"\s*'([^']+)'\s*=\s*(\d+)\s*", part)
    if not pm:
      raise ValueError(f"unparsed mesh replica_groups {m.group(0)!r} in HLO line: {line[:300]}")
    names.append(pm.group(1))
    sizes.append(int(pm.group(2)))
  if m.group(3) is None:
    span = list(names)
  else:
    span = [a.strip().strip("'") for a in m.group(3).split(",") if a.strip()]
    if any(a not in names for a in span):
      raise ValueError(f"unparsed mesh replica_groups axes {m.group(3)!r} in: {line[:300]}")
  ids = np.arange(math.prod(sizes))
  text = m.group(0)
  dm = re.search(r"device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\)", text)
  if dm:
    ids = _iota_ids(_ints(dm.group(1)), _ints(dm.group(2)) if dm.group(2) else None).reshape(-1)
  else:
    dm = re.search(r"device_ids=\(([0-9,\s]+)\)", text)
    if dm:
      ids = np.asarray(_ints(dm.group(1)))
  if ids.size != math.prod(sizes):
    raise ValueError(f"mesh replica_groups with {ids.size} device ids for mesh sizes {sizes}: "
                     f"{line[:300]}")
  grid = ids.reshape(sizes)
  span_idx = [names.index(a) for a in span]
  rest = [i for i in range(len(names)) if i not in span_idx]
  return grid.transpose(rest + span_idx).reshape(-1, math.prod(sizes[i] for i in span_idx)).tolist()


def parse_device_groups(line: str, num_devices: int) -> list[list[int]]:
  """The device groups of one HLO collective: replica_groups in explicit {{0,1},{2,3}},
  iota [G,N]<=[dims]T(perm) or mesh['axis_0'=2,..] {'axis_0'} form, or collective-permute
  source_target_pairs (each pair one group). Empty or absent replica_groups = all devices
  in one group. An unrecognised form raises ValueError (a checker must not pass by
  misreading)."""
  m = re.search(r"source_target_pairs=\{((?:\{[0-9,]*\},?)*)\}", line)
  if m:
    return [_ints(g) for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
  groups = _mesh_groups(line)
  if groups is not None:
    return groups
  m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
  if m:
    ids = _iota_ids(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
    return ids.reshape(_ints(m.group(1))[0], -1).tolist()
  m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", line)
  if m:
    groups = [_ints(g) for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
    return groups or [list(range(num_devices))]
  if "replica_groups=" in line or "source_target_pairs=" in line:
    raise ValueError(f"unparsed device groups in HLO line: {line[:300]}")
  return [list(range(num_devices))]


_COMPUTATION_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLEE_RE = re.compile(r"(body|condition|calls|to_apply)=%([\w.\-]+)")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def computation_multipliers(hlo_text: str) -> tuple[dict[str, int], dict[str, str]]:
  """How many times each computation runs per execution of the entry computation (while
  bodies x their known trip count), and which computation each instruction line is in.

  Returns ({computation: runs}, {stripped line: computation}). A while loop without a
  known trip count counts its body once (and is listed in the result as runs=-1 marker
  via the name '<unknown trip count>' when present)."""
  calls: dict[str, list[tuple[str, int]]] = {}
  where: dict[str, str] = {}
  entry, current = None, None
  for raw in hlo_text.splitlines():
    cm = _COMPUTATION_RE.match(raw.strip())
    if cm and raw.lstrip().startswith(("ENTRY", "%")) and raw.rstrip().endswith("{"):
      current = cm.group(1)
      calls.setdefault(current, [])
      if raw.lstrip().startswith("ENTRY"):
        entry = current
      continue
    if current is None:
      continue
    line = raw.strip()
    where[line] = current
    trips = _TRIP_RE.search(line)
    is_while = " while(" in line
    for kind, callee in _CALLEE_RE.findall(line):
      n = int(trips.group(1)) if (is_while and kind == "body" and trips) else 1
      calls[current].append((callee, n))
    for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
      for callee in re.findall(r"%([\w.\-]+)", group):
        calls[current].append((callee, 1))
  runs: dict[str, int] = {}

  def visit(name: str, count: int, depth: int = 0):
    if depth > 64:
      return
    runs[name] = max(runs.get(name, 0), count)
    for callee, n in calls.get(name, ()):
      visit(callee, count * n, depth + 1)
  if entry is not None:
    visit(entry, 1)
  return runs, where


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  bytes: int           # max(operand bytes, result bytes): an upper bound on what moves
  groups: tuple
  crosses: bool        # some group spans devices with different coordinates on the axis
  text: str
  runs: int = 1        # executions per step (trip counts of the enclosing while loops)

  @property
  def bytes_per_step(self) -> int:
    return self.bytes * self.runs

  @property
  def bytes_leaving_device_per_step(self) -> int:
    """bytes_per_step without an all-to-all's own slot: of its g equal slots, the one a
    device addresses to itself never leaves it. Other kinds: bytes_per_step (a bound)."""
    g = len(self.groups[0]) if self.groups else 1
    if self.kind.startswith("all-to-all") and g > 1:
      return self.bytes_per_step * (g - 1) // g
    return self.bytes_per_step


def hlo_collectives(hlo_text: str, mesh: Mesh, axis: str = "expert") -> list[Collective]:
  """Every collective in optimized HLO text, with whether it crosses mesh `axis`.

  Device ids in the groups are positions in the executable's device assignment, which for
  a jit over `mesh` is mesh.devices.flat order; a group crosses `axis` when its devices
  have different coordinates on it. `runs` multiplies in the trip counts of enclosing
  while loops (scans over layers or vocabulary tiles)."""
  shape = mesh.devices.shape
  axis_index = mesh.axis_names.index(axis)
  runs, where = computation_multipliers(hlo_text)
  out = []
  for line in hlo_text.splitlines():
    m = _OP_RE.search(line)
    if not m:
      continue
    result_text, kind, _, operands = m.groups()
    groups = parse_device_groups(line, mesh.devices.size)
    bad = [d for g in groups for d in g if not 0 <= d < mesh.devices.size]
    if bad:
      raise ValueError(f"device ids {bad[:4]} outside the mesh of {mesh.devices.size} devices "
                       f"in: {line.strip()[:300]}")
    crosses = any(len({np.unravel_index(d, shape)[axis_index] for d in g}) > 1 for g in groups)
    size = max(_shapes_bytes(result_text), _shapes_bytes(operands))
    out.append(Collective(kind, size, tuple(tuple(g) for g in groups), crosses, line.strip(),
                          max(1, runs.get(where.get(line.strip(), ""), 1))))
  return out


def collectives_crossing_axis(hlo_text: str, mesh: Mesh, axis: str = "expert") -> dict:
  """Summary of the collectives that cross `axis`: {count, total_bytes (per step, loop
  trips included), total_bytes_leaving_device (the same without all-to-all own slots),
  max_bytes (largest single collective), collectives}."""
  crossing = [c for c in hlo_collectives(hlo_text, mesh, axis) if c.crosses]
  return {"count": len(crossing), "total_bytes": sum(c.bytes_per_step for c in crossing),
          "total_bytes_leaving_device": sum(c.bytes_leaving_device_per_step for c in crossing),
          "max_bytes": max((c.bytes for c in crossing), default=0), "collectives": crossing}


def tree_bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------- abstract lowering (pod configs)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      tree, shardings)


def abstract_opd_update(cfg, run: RunSharding, num_layers: int | None = None,
                        native_prompts: int | None = None, cross_prompts: int | None = None,
                        topology: str | None = None):
  """The CoPD OPD-step update of a run config as (ShardedFunction, abstract args): params,
  optimizer state and rows are jax.ShapeDtypeStruct with their shardings; nothing is
  allocated. Lower/compile with `fn.lower(*args).compile()`.

  num_layers / native_prompts / cross_prompts / topology ('hub' or 'full') override the
  config (cheap test lowering, traffic of another topology). Micro-batching:
  rl.micro_batch_rows (0 when absent).
  Rows: [S, (native + cross) * G, max_prompt_len + max_response_len]; routing: the live
  teachers' topology (hub = rl.opd.hub), as CoPD uses it.
  """
  from copd_jax import experts, kernels, objectives, schedules, trainer
  from copd_jax import model as model_lib
  model_fields = cfg.model.to_dict()
  if num_layers is not None:
    model_fields["num_layers"] = int(num_layers)
  model_cfg = model_lib.ModelConfig.from_dict(model_fields)
  rl = cfg.rl
  ucfg = trainer.UpdateConfig(model=model_cfg, loss=objectives.PolicyLossConfig(**rl.loss.to_dict()),
                              kernel=kernels.KernelConfig(**rl.kernel.to_dict()),
                              scale_by_std=rl.scale_by_std,
                              micro_batch_rows=int(rl.get("micro_batch_rows", 0)),
                              samples_per_prompt=rl.samples_per_prompt)
  optimizer = trainer.make_optimizer(rl.learning_rate, rl.grad_clip_norm, rl.weight_decay)
  s = cfg.num_experts
  caps = tuple(rl.capabilities)
  topology = topology or rl.opd.topology
  hub = caps.index(rl.opd.hub) if topology == "hub" else 0
  native = rl.native_prompts if native_prompts is None else native_prompts
  cross = rl.cross_prompts if cross_prompts is None else cross_prompts
  g = rl.samples_per_prompt
  stage = trainer.Stage(
      name="abstract", steps=1, student_data=tuple((c,) for c in caps),
      teacher_data=tuple((c,) for c in caps), live_teachers=True,
      topology=schedules.topology_matrix(s, topology, hub=hub),
      branch_beta=np.full(s, rl.opd.beta, np.float32), schedule=schedules.OPDSchedule(kind="cycle"),
      native_prompts=native, cross_prompts=cross, samples_per_prompt=g)
  routing = trainer.teacher_routing(trainer.cross_teacher_assignment(stage), s, g,
                                    native_rows=native * g)
  params = jax.eval_shape(lambda k: experts.init_stacked(model_cfg, k),
                          jax.random.split(jax.random.key(0), s))
  opt_state = jax.eval_shape(lambda p: trainer.init_optimizer_state(optimizer, p), params)
  r = (native + cross) * g
  t = cfg.data.max_prompt_len + cfg.data.max_response_len
  v = model_cfg.vision
  f32, i32 = jnp.float32, jnp.int32
  sds = jax.ShapeDtypeStruct
  rows = trainer.Rows(tokens=sds((s, r, t), i32), positions=sds((s, r, t), i32),
                      token_mask=sds((s, r, t), jnp.bool_), response_mask=sds((s, r, t), f32),
                      old_logprobs=sds((s, r, t), f32), advantages=sds((s, r), f32),
                      opd_beta=sds((s, r), f32),
                      frames=sds((s, r, v.num_frames, v.image_size, v.image_size, v.channels), f32))
  routing_arrays = {k: sds(np.shape(x), np.asarray(x).dtype, sharding=run.replicated)
                    for k, x in dataclasses.asdict(routing).items()}
  fn = run.update_fn(ucfg, optimizer, distil=True, kl=False, cross_row_start=native * g,
                     prompt_len=cfg.data.max_prompt_len)
  a_params = _abstract(params, run.stacked_params(params))
  args = (a_params, _abstract(opt_state, run.opt_state(opt_state)), a_params,
          _abstract(rows, run.rows(rows)), routing_arrays, None)
  return fn, args


def compiled_memory_bytes(compiled) -> dict:
  """Per-device bytes from compiled.memory_analysis(): arguments (params, optimizer state,
  teachers, rows), outputs, temporaries (activations, gradients, workspace), generated
  code, and their total (argument + output + temp; aliased buffers counted once)."""
  ma = compiled.memory_analysis()
  get = lambda name: int(getattr(ma, name, 0) or 0)
  out = {"argument_bytes": get("argument_size_in_bytes"), "output_bytes": get("output_size_in_bytes"),
         "temp_bytes": get("temp_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes"),
         "generated_code_bytes": get("generated_code_size_in_bytes")}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  return out
