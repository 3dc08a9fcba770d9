"""Who distils whom, and when: the teacher matrix beta[k, j](t) of CoPD and its baselines.

beta[k, j] > 0 means branch k (student) samples on branch j's prompts and uses
beta[k, j] * (log pi_j(y_t) - log pi_k(y_t)) as a token advantage (the paper's Phase II).
The matrix is the product of a *topology* (which pairs exchange at all), per-branch
*rates* (asymmetric beta_k) and a *schedule* (when OPD is on). It is computed on the host
and fed to the jitted step as data, so changing it never recompiles.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TOPOLOGIES = ("none", "hub", "full", "ring", "one_way")
SCHEDULES = ("none", "cycle", "constant", "adaptive")


def topology_matrix(num_branches: int, kind: str, hub: int = 0, teacher: int = 0,
                    student: int = 1) -> np.ndarray:
  """0/1 float32[E, E] (student k, teacher j), zero diagonal.

  none: no distillation. full: every ordered pair. hub: hub <-> every spoke, spokes don't
  teach each other (the paper's choice for K > 2). ring: every branch exchanges with its
  two neighbours k - 1 and k + 1 (mod E), both ways: 2 teachers per student whatever E,
  so O(E) pairs against the full mesh's O(E^2) (for E <= 3 it is the full mesh).
  one_way: a single teacher -> student edge (static OPD).
  """
  if kind not in TOPOLOGIES:
    raise ValueError(f"topology must be one of {TOPOLOGIES}, got {kind!r}")
  if num_branches < 1:
    raise ValueError(f"num_branches must be positive, got {num_branches}")
  m = np.zeros((num_branches, num_branches), np.float32)
  if kind == "full":
    m[:] = 1.0
  elif kind == "ring":
    k = np.arange(num_branches)
    m[k, (k + 1) % num_branches] = 1.0
    m[k, (k - 1) % num_branches] = 1.0
  elif kind == "hub":
    if not 0 <= hub < num_branches:
      raise ValueError(f"hub must index a branch in [0, {num_branches}), got {hub}")
    m[hub, :] = 1.0
    m[:, hub] = 1.0
  elif kind == "one_way":
    for name, idx in (("teacher", teacher), ("student", student)):
      if not 0 <= idx < num_branches:
        raise ValueError(f"{name} must index a branch in [0, {num_branches}), got {idx}")
    if teacher == student:
      raise ValueError("one_way topology needs teacher != student")
    m[student, teacher] = 1.0
  np.fill_diagonal(m, 0.0)
  return m


@dataclasses.dataclass(frozen=True)
class OPDSchedule:
  """When OPD is on, as a multiplier in [0, 1] on the topology at each step.

  cycle:    repeat S_RL steps of RL only, then S_OPD steps of RL + OPD (paper: 1.5 : 1).
  constant: OPD at weight `constant_weight` on every step (RL + lambda * OPD).
  adaptive: RL only until the measured branch overlap drops below `overlap_target`, then
            an OPD phase of S_OPD steps; repeat.
  none:     never (independent experts).
  `warmup_steps` of RL only come first for every kind.
  """
  kind: str = "cycle"
  s_rl: int = 3
  s_opd: int = 2
  constant_weight: float = 1.0
  overlap_target: float = 0.9
  warmup_steps: int = 0

  def __post_init__(self):
    if self.kind not in SCHEDULES:
      raise ValueError(f"schedule.kind must be one of {SCHEDULES}, got {self.kind!r}")
    if self.kind in ("cycle", "adaptive"):
      if self.s_opd < 1:
        raise ValueError(f"schedule.s_opd must be >= 1 for {self.kind!r}, got {self.s_opd}")
      if self.kind == "cycle" and self.s_rl < 0:
        raise ValueError(f"schedule.s_rl must be >= 0, got {self.s_rl}")
    if self.warmup_steps < 0:
      raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
    if not 0.0 <= self.constant_weight:
      raise ValueError(f"schedule.constant_weight must be >= 0, got {self.constant_weight}")
    if not 0.0 <= self.overlap_target <= 1.0:
      raise ValueError(f"schedule.overlap_target must be in [0, 1], got {self.overlap_target}")


@dataclasses.dataclass
class ScheduleState:
  """Host-side state of the adaptive schedule (checkpointable: plain ints)."""
  opd_steps_left: int = 0


def opd_weight(schedule: OPDSchedule, step: int, state: ScheduleState,
               last_overlap: float | None = None) -> float:
  """The OPD multiplier for 0-based `step`; advances `state` for the adaptive kind."""
  if schedule.kind == "none" or step < schedule.warmup_steps:
    return 0.0
  t = step - schedule.warmup_steps
  if schedule.kind == "constant":
    return schedule.constant_weight
  if schedule.kind == "cycle":
    period = schedule.s_rl + schedule.s_opd
    return 1.0 if t % period >= schedule.s_rl else 0.0
  # adaptive
  if state.opd_steps_left == 0 and last_overlap is not None and last_overlap < schedule.overlap_target:
    state.opd_steps_left = schedule.s_opd
  if state.opd_steps_left > 0:
    state.opd_steps_left -= 1
    return 1.0
  return 0.0


def teacher_matrix(topology: np.ndarray, branch_beta: np.ndarray, weight: float) -> np.ndarray:
  """beta[k, j] = weight * branch_beta[k] * topology[k, j]  (float32[E, E]).

  branch_beta: float32[E], each student's own OPD rate (asymmetric rates allowed).
  """
  branch_beta = np.asarray(branch_beta, np.float32)
  if branch_beta.shape != (topology.shape[0],):
    raise ValueError(f"branch_beta must have shape ({topology.shape[0]},), got {branch_beta.shape}")
  if np.any(branch_beta < 0):
    raise ValueError(f"branch_beta must be non-negative, got {branch_beta}")
  return (weight * branch_beta[:, None] * topology).astype(np.float32)
