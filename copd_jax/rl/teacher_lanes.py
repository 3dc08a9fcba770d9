"""Teacher work balanced over the lanes of an `expert` mesh axis (host-side, static).

On a mesh whose `expert` axis spreads the J teachers over several device groups, the
teacher forwards run as one SPMD program: every lane (the device group of teacher j) runs
a call of the same shape at the same time. Padding every teacher to the largest load
makes the hub's lane set the pace while the spokes' lanes score padding (hub of 3: half
of the rows computed are padding). Instead each teacher's prompts are cut into chunks of
`bucket` prompts, and the chunks are dealt to the lanes: a lane first runs its own
teacher's chunks, then takes the overflow of the busiest teachers. The lanes run
`trips` rounds; in round i, lane l scores chunk (l, i) with that chunk's teacher's
parameters (copied to lane l when it is another teacher's: parameters cross `expert`
for the hub's overflow only, instead of every lane waiting on the hub).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LanePlan:
  """Which chunk of which teacher each lane scores in each round.

  bucket: prompts per chunk (every call scores bucket x G rows).
  teacher: int[lanes, trips] — the teacher of lane l's chunk in round i (padding chunks:
    the lane's own teacher, no real prompt).
  first: int[lanes, trips] — the chunk's first prompt in its teacher's compacted prompts.
  count: int[lanes, trips] — the chunk's real prompts (0..bucket; the rest is padding).
  """
  bucket: int
  teacher: np.ndarray
  first: np.ndarray
  count: np.ndarray

  @property
  def lanes(self) -> int:
    return self.teacher.shape[0]

  @property
  def trips(self) -> int:
    return self.teacher.shape[1]

  def computed_prompts(self) -> int:
    """Prompt slots the teacher forwards compute, padding included."""
    return self.lanes * self.trips * self.bucket

  def is_one_round_own_teachers(self) -> bool:
    """One round in which every lane runs its own teacher (equal loads): nothing but
    the token exchange crosses lanes."""
    return self.trips == 1 and np.array_equal(self.teacher[:, 0], np.arange(self.lanes))

  def chunk_place(self, teacher: int) -> np.ndarray:
    """int[chunks of `teacher`]: the flat (lane * trips + trip) index of each of its
    chunks, in prompt order."""
    real = (self.teacher == teacher) & (self.count > 0)
    flat = np.flatnonzero(real.reshape(-1))
    return flat[np.argsort(self.first.reshape(-1)[flat], kind="stable")]


def _trips(loads: np.ndarray, lanes: int, bucket: int) -> int:
  chunks = -(-loads // bucket)
  return max(1, int(-(-chunks.sum() // lanes)), 1)


def choose_bucket(loads, lanes: int) -> int:
  """The chunk size (prompts) that computes the fewest prompt slots over `lanes` lanes;
  on a tie the larger one (fewer, larger calls)."""
  loads = np.asarray(loads, np.int64)
  best = None
  for bucket in range(1, max(1, int(loads.max(initial=0))) + 1):
    cost = (lanes * _trips(loads, lanes, bucket) * bucket, -bucket)
    best = cost if best is None or cost < best else best
  return -best[1]


def lane_plan(loads, lanes: int | None = None) -> LanePlan:
  """The balanced plan for teacher loads int[J] (prompts each) over `lanes` lanes
  (default J: one lane per teacher). Lane l runs its own teacher's chunks first (l < J),
  then the leftover chunks of the most loaded teachers fill the lanes with room."""
  loads = np.asarray(loads, np.int64)
  j_count = len(loads)
  lanes = j_count if lanes is None else lanes
  if lanes < 1 or np.any(loads < 0):
    raise ValueError(f"lane_plan needs lanes >= 1 and loads >= 0; got {lanes}, {loads}")
  bucket = choose_bucket(loads, lanes)
  trips = _trips(loads, lanes, bucket)
  own = np.arange(lanes) % max(1, j_count)
  teacher, first, count = own[:, None].repeat(trips, 1), np.zeros((lanes, trips), int), \
      np.zeros((lanes, trips), int)
  fill = np.zeros(lanes, int)
  leftover = []
  for j in range(j_count):
    starts = list(range(0, int(loads[j]), bucket))
    mine = starts[:trips] if j < lanes else []
    for start in mine:
      teacher[j, fill[j]], first[j, fill[j]] = j, start
      count[j, fill[j]] = min(bucket, loads[j] - start)
      fill[j] += 1
    leftover += [(j, s) for s in starts[len(mine):]]
  for j, start in leftover:  # busiest teachers' overflow, into the emptiest lanes
    lane = int(np.argmin(fill))
    teacher[lane, fill[lane]], first[lane, fill[lane]] = j, start
    count[lane, fill[lane]] = min(bucket, loads[j] - start)
    fill[lane] += 1
  return LanePlan(bucket, teacher, first, count)
