import numpy as np
import pytest

from copd_jax.rl import schedules


def test_hub_topology_connects_hub_with_spokes_only():
  m = schedules.topology_matrix(3, "hub", hub=0)
  np.testing.assert_array_equal(m, [[0, 1, 1], [1, 0, 0], [1, 0, 0]])
  np.testing.assert_array_equal(schedules.topology_matrix(3, "full"), 1 - np.eye(3))
  np.testing.assert_array_equal(schedules.topology_matrix(2, "one_way", teacher=0, student=1),
                                [[0, 0], [1, 0]])
  assert not schedules.topology_matrix(3, "none").any()


def test_ring_topology_each_branch_with_its_two_neighbours():
  # Hand-written: 5 branches on a circle 0-1-2-3-4-0, each student taught by both
  # neighbours (and teaching them back).
  np.testing.assert_array_equal(schedules.topology_matrix(5, "ring"), [
      [0, 1, 0, 0, 1],
      [1, 0, 1, 0, 0],
      [0, 1, 0, 1, 0],
      [0, 0, 1, 0, 1],
      [1, 0, 0, 1, 0]])
  np.testing.assert_array_equal(schedules.topology_matrix(3, "ring"), 1 - np.eye(3))
  np.testing.assert_array_equal(schedules.topology_matrix(2, "ring"), [[0, 1], [1, 0]])
  assert not schedules.topology_matrix(1, "ring").any()


def test_ring_teacher_assignment_round_robin_over_the_two_neighbours():
  from copd_jax.rl import stages
  n, cross = 6, 4
  stage = stages.Stage(
      name="ring", steps=1, student_data=tuple((f"c{i}",) for i in range(n)),
      teacher_data=tuple((f"c{i}",) for i in range(n)), live_teachers=True,
      topology=schedules.topology_matrix(n, "ring"), branch_beta=np.ones(n, np.float32),
      schedule=schedules.OPDSchedule(kind="cycle"), native_prompts=2, cross_prompts=cross,
      samples_per_prompt=2)
  assignment = stages.cross_teacher_assignment(stage)
  # Student k's cross prompts alternate between its lower and upper neighbour.
  expected = [[min((k - 1) % n, (k + 1) % n), max((k - 1) % n, (k + 1) % n)] * 2
              for k in range(n)]
  np.testing.assert_array_equal(assignment, expected)


def test_topology_errors():
  with pytest.raises(ValueError, match="topology must be one of"):
    schedules.topology_matrix(3, "star")
  with pytest.raises(ValueError, match="hub must index a branch"):
    schedules.topology_matrix(3, "hub", hub=3)
  with pytest.raises(ValueError, match="teacher != student"):
    schedules.topology_matrix(2, "one_way", teacher=1, student=1)


def test_cycle_schedule_alternates_rl_then_opd_after_warmup():
  sched = schedules.OPDSchedule(kind="cycle", s_rl=3, s_opd=2, warmup_steps=2)
  state = schedules.ScheduleState()
  weights = [schedules.opd_weight(sched, t, state) for t in range(12)]
  assert weights == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1]


def test_constant_and_none():
  state = schedules.ScheduleState()
  const = schedules.OPDSchedule(kind="constant", constant_weight=0.25)
  assert all(schedules.opd_weight(const, t, state) == 0.25 for t in range(5))
  none = schedules.OPDSchedule(kind="none")
  assert all(schedules.opd_weight(none, t, state) == 0.0 for t in range(5))


def test_adaptive_starts_opd_phase_when_overlap_falls_below_target():
  sched = schedules.OPDSchedule(kind="adaptive", s_opd=2, overlap_target=0.9)
  state = schedules.ScheduleState()
  overlaps = [0.95, 0.93, 0.85, 0.80, 0.97, 0.88, 0.99]
  weights = [schedules.opd_weight(sched, t, state, o) for t, o in enumerate(overlaps)]
  assert weights == [0, 0, 1, 1, 0, 1, 1]


def test_teacher_matrix_scales_rows_by_student_rate():
  topo = schedules.topology_matrix(3, "hub", hub=0)
  beta = schedules.teacher_matrix(topo, np.array([0.5, 1.0, 2.0]), weight=1.0)
  np.testing.assert_allclose(beta, [[0, 0.5, 0.5], [1, 0, 0], [2, 0, 0]])
  assert not schedules.teacher_matrix(topo, np.ones(3), 0.0).any()
  with pytest.raises(ValueError, match="branch_beta must have shape"):
    schedules.teacher_matrix(topo, np.ones(2), 1.0)


def test_schedule_validation():
  with pytest.raises(ValueError, match="schedule.kind"):
    schedules.OPDSchedule(kind="sometimes")
  with pytest.raises(ValueError, match="schedule.s_opd"):
    schedules.OPDSchedule(kind="cycle", s_opd=0)
