"""Reads compiled HLO: which collectives cross the expert axis and how many bytes they move."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

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


def loop_body_copies(hlo_text: str, dims: Sequence[int]) -> int:
  """How many `copy` instructions of shape dims (any dtype and layout) the bodies of the
  while loops in compiled HLO text hold at their top level (a copy there is a whole
  buffer copied on every trip; copies inside fused computations are not counted)."""
  bodies = set(re.findall(r"body=%([\w.\-]+)", hlo_text))
  shape = re.escape(",".join(str(int(d)) for d in dims))
  copy_re = re.compile(rf"=\s*\w+\[{shape}\]\{{[^}}]*\}}\s+copy\(")
  count, current = 0, None
  for raw in hlo_text.splitlines():
    cm = _COMPUTATION_RE.match(raw.strip())
    if cm and raw.rstrip().endswith("{"):
      current = cm.group(1)
      continue
    if raw.startswith("}"):
      current = None
    elif current in bodies and copy_re.search(raw):
      count += 1
  return count
