"""A training stage (who learns from which data and which teachers) and the method table."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax.rl import schedules, teacher_lanes


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: who learns, from which data, and who teaches whom when.

  student_data[k]: the capabilities of student k's native (GRPO) prompts; () = none
    (e.g. the MOPD student, which only distils).
  teacher_data[j]: the capabilities of teacher j's domain: a student distilling from j
    samples on these prompts.
  live_teachers: the teachers are the students themselves, as they are at this step
    (CoPD); otherwise `frozen_teachers` params are passed to `loop.run_stage`.
  topology: f32[S, J] 0/1, which (student, teacher) pairs exchange at all.
  branch_beta: f32[S], each student's OPD rate beta_k.
  """
  name: str
  steps: int
  student_data: tuple[tuple[str, ...], ...]
  teacher_data: tuple[tuple[str, ...], ...]
  live_teachers: bool
  topology: np.ndarray
  branch_beta: np.ndarray
  schedule: schedules.OPDSchedule
  native_prompts: int
  cross_prompts: int
  samples_per_prompt: int
  cross_outcome_reward: bool = False  # also use GRPO advantages on cross rows (MOPD option)

  def __post_init__(self):
    s, j = len(self.student_data), len(self.teacher_data)
    if self.topology.shape != (s, j):
      raise ValueError(f"stage {self.name}: topology shape {self.topology.shape} must be "
                       f"(students={s}, teachers={j})")
    if self.live_teachers and s != j:
      raise ValueError(f"stage {self.name}: live teachers need as many teachers as students")
    if self.native_prompts == 0 and self.schedule.kind != "constant":
      raise ValueError(f"stage {self.name}: with no native prompts the schedule must be "
                       "'constant' (every step distils)")
    if self.steps < 0 or self.native_prompts < 0 or self.cross_prompts < 0:
      raise ValueError(f"stage {self.name}: steps and prompt counts must be >= 0")
    if self.samples_per_prompt < 1:
      raise ValueError(f"stage {self.name}: samples_per_prompt must be >= 1")

  @property
  def num_students(self) -> int:
    return len(self.student_data)

  @property
  def distils(self) -> bool:
    return bool(np.any(self.topology * self.branch_beta[:, None] > 0)) and self.cross_prompts > 0


def branch_names(stage: Stage) -> list[str]:
  """Each student's name: its capabilities joined by '+' ('student' without any)."""
  return ["+".join(caps) if caps else "student" for caps in stage.student_data]


# Row kinds on the host: a native row, or a cross slot of a student that has no teacher
# (kept only so every student has the same number of rows; fully masked). Cross rows
# carry their teacher's index j >= 0.
NATIVE = -1
NO_TEACHER = -2


def cross_teacher_assignment(stage: Stage) -> np.ndarray:
  """int32[S, B_cross]: the teacher of each cross prompt of each student.

  Prompts go round-robin over the student's teachers, so a hub student splits its cross
  batch between its spokes. Students without a teacher get NO_TEACHER (rows masked out).
  """
  pattern = (stage.topology * stage.branch_beta[:, None]) > 0
  out = np.full((stage.num_students, stage.cross_prompts), NO_TEACHER, np.int32)
  for k in range(stage.num_students):
    teachers = np.flatnonzero(pattern[k])
    if len(teachers):
      out[k] = teachers[np.arange(stage.cross_prompts) % len(teachers)]
  return out


@dataclasses.dataclass(frozen=True)
class TeacherRouting:
  """Static regrouping of cross rows by teacher, laid out for an all-to-all over the
  expert axis (computed once per stage on the host).

  Rows per student are [native rows | cross rows], the G samples of a prompt adjacent.
  Every student k packs the rows it sends to teacher j into slot j of a send buffer
  [S, J, C, ...] (C = the most rows any (student, teacher) pair exchanges; a pair with
  fewer rows is padded). Swapping the first two axes is the exchange: teacher j then holds
  [S, C] rows, i.e. every student's rows for j, and the scores travel back the same way.
  The padding only travels (token ids); the teacher scores its real prompts alone:
  teacher_prompts[j] compacts what it received before its forward, and teacher_row_back
  puts the scores back into the received layout.
  send_row: int32[S, J, C] — the row (index into the student's R rows) in slot (j, c);
    padding points at the first cross row.
  send_valid: bool[S, J, C] — False for padding.
  send_prompt_row: int32[S, J, C // G] — the first row of each prompt in the slot (the G
    rows of a prompt share its prompt tokens and frames, so those move once per prompt).
  receive_slot: int32[S, R] — where each row's score lands in the student's returned
    [J * C] scores (native rows: 0, unused because their beta is 0).
  teacher_prompts: J arrays int32[L_j] — teacher j's real prompts, as indices into the
    prompt slots it received, flattened [S * C // G] (student-major). L_j (a shape, so
    static under jit) is teacher j's load in prompts; 0 for a teacher nobody asks.
  teacher_row_back: int32[J, S * C] — for each row slot teacher j received, its row in
    teacher j's compacted rows [L_j * G] (padding: 0, never read back).
  """
  send_row: np.ndarray
  send_valid: np.ndarray
  send_prompt_row: np.ndarray
  receive_slot: np.ndarray
  teacher_prompts: tuple
  teacher_row_back: np.ndarray

  def as_tree(self) -> dict:
    """The fields as a pytree of numpy arrays ({name: array}). teacher_prompts: one
    int32[J, L] array when every teacher has the same load L, else a tuple of J arrays.
    (On an expert=2 mesh the tuple form compiled an extra 8-byte all-reduce across
    `expert` that the stacked form does not.)"""
    tree = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if len({len(p) for p in self.teacher_prompts}) == 1:
      tree["teacher_prompts"] = np.stack(self.teacher_prompts)
    return tree

  def as_arrays(self) -> dict:
    """The fields as device arrays, the `routing` argument of `update`."""
    return jax.tree.map(jnp.asarray, self.as_tree())

  @property
  def samples(self) -> int:
    return self.send_row.shape[2] // self.send_prompt_row.shape[2]

  def teacher_loads(self) -> list[int]:
    """Rows each teacher must score (its real prompts x G)."""
    return [len(p) * self.samples for p in self.teacher_prompts]

  def teacher_forward_rows(self, equal_loads: bool = False) -> int:
    """Rows the teacher forwards score per step, all teachers: the assigned rows alone
    (each teacher its own load, as on one device or an `expert` axis of size 1), or with
    equal_loads the calls of one shape an `expert` axis of several device groups runs:
    the balanced lane plan's chunks, padding included (teacher_lanes.lane_plan)."""
    loads = self.teacher_loads()
    if not equal_loads:
      return sum(loads)
    prompts = [len(p) for p in self.teacher_prompts]
    return teacher_lanes.lane_plan(prompts).computed_prompts() * self.samples


def teacher_routing(assignment: np.ndarray, num_teachers: int, samples: int,
                    native_rows: int = 0) -> TeacherRouting:
  """assignment: int32[S, B_cross] (per prompt; NO_TEACHER for a student without teachers)
  -> routing for rows laid out as [native_rows native rows | B_cross*G cross rows] per
  student (cross prompt b's samples are rows native_rows + b*G .. + G - 1)."""
  assignment = np.asarray(assignment)
  s, b_cross = assignment.shape
  j_count = num_teachers
  if np.any((assignment >= j_count) | ((assignment < 0) & (assignment != NO_TEACHER))):
    raise ValueError(f"assignment holds teacher ids outside [0, {j_count}) / NO_TEACHER: "
                     f"{np.unique(assignment).tolist()}")
  prompts = [[np.flatnonzero(assignment[k] == j) for j in range(j_count)] for k in range(s)]
  cp = max([1] + [len(p) for per_k in prompts for p in per_k])  # prompts per slot
  c = cp * samples
  send_prompt_row = np.full((s, j_count, cp), native_rows, np.int32)
  send_row = np.full((s, j_count, c), native_rows, np.int32)
  send_valid = np.zeros((s, j_count, c), bool)
  receive_slot = np.zeros((s, native_rows + b_cross * samples), np.int32)
  teacher_prompts = [[] for _ in range(j_count)]
  teacher_row_back = np.zeros((j_count, s * c), np.int32)
  for k in range(s):
    for j in range(j_count):
      first_rows = native_rows + prompts[k][j] * samples  # [n_prompts]
      rows = (first_rows[:, None] + np.arange(samples)).reshape(-1)
      send_prompt_row[k, j, :len(first_rows)] = first_rows
      send_row[k, j, :len(rows)] = rows
      send_valid[k, j, :len(rows)] = True
      receive_slot[k, rows] = j * c + np.arange(len(rows))
      # On teacher j's side: student k's prompts sit at slots k*cp + q of what it received.
      compact_first = len(teacher_prompts[j]) * samples
      teacher_prompts[j].extend(k * cp + np.arange(len(first_rows)))
      teacher_row_back[j, k * c:k * c + len(rows)] = compact_first + np.arange(len(rows))
  return TeacherRouting(send_row, send_valid, send_prompt_row, receive_slot,
                        tuple(np.asarray(p, np.int32) for p in teacher_prompts),
                        teacher_row_back)


def _schedule(rl) -> schedules.OPDSchedule:
  return rl.opd.schedule


def _branch_beta(rl, caps) -> np.ndarray:
  return np.array([rl.opd.branch_beta.get(c, rl.opd.beta) for c in caps], np.float32)


def _stage(rl, *, name, steps, student_data, teacher_data, live, topology, branch_beta,
           schedule, native_prompts=None, cross_prompts=None, cross_outcome_reward=False):
  """A Stage from the config's rl section and this stage's fields (keywords only)."""
  return Stage(
      name=name, steps=steps, student_data=tuple(student_data),
      teacher_data=tuple(teacher_data), live_teachers=live,
      topology=np.asarray(topology, np.float32), branch_beta=np.asarray(branch_beta, np.float32),
      schedule=schedule,
      native_prompts=rl.native_prompts if native_prompts is None else native_prompts,
      cross_prompts=rl.cross_prompts if cross_prompts is None else cross_prompts,
      samples_per_prompt=rl.samples_per_prompt, cross_outcome_reward=cross_outcome_reward)


def experts_stage(rl, caps) -> Stage:
  e = len(caps)
  return _stage(rl, name="experts", steps=rl.steps, student_data=[(c,) for c in caps],
                teacher_data=[(c,) for c in caps], live=True, topology=np.zeros((e, e)),
                branch_beta=np.zeros(e), schedule=schedules.OPDSchedule(kind="none"))


def mixed_stage(rl, caps) -> Stage:
  return _stage(rl, name="mixed_rlvr", steps=rl.steps * len(caps), student_data=[tuple(caps)],
                teacher_data=[tuple(caps)], live=True, topology=np.zeros((1, 1)),
                branch_beta=np.zeros(1), schedule=schedules.OPDSchedule(kind="none"))


def copd_stage(rl, caps) -> Stage:
  e = len(caps)
  hub = caps.index(rl.opd.hub) if rl.opd.topology == "hub" else 0
  topology = schedules.topology_matrix(e, rl.opd.topology, hub=hub)
  return _stage(rl, name="copd", steps=rl.steps, student_data=[(c,) for c in caps],
                teacher_data=[(c,) for c in caps], live=True, topology=topology,
                branch_beta=_branch_beta(rl, caps), schedule=_schedule(rl))


def static_opd_stage(rl, caps) -> Stage:
  """Student expert keeps its GRPO batch and distils one way from the frozen teacher."""
  student, teacher = rl.static_opd.student, rl.static_opd.teacher
  return _stage(rl, name="static_opd", steps=rl.distill_steps, student_data=[(student,)],
                teacher_data=[(teacher,)], live=False, topology=np.ones((1, 1)),
                branch_beta=_branch_beta(rl, [student]),
                schedule=schedules.OPDSchedule(kind="constant"))


def mopd_stage(rl, caps) -> Stage:
  """A student from the base distils from every frozen expert; no native GRPO batch."""
  e = len(caps)
  return _stage(rl, name="mopd", steps=rl.distill_steps, student_data=[()],
                teacher_data=[(c,) for c in caps], live=False, topology=np.ones((1, e)),
                branch_beta=np.full(1, rl.opd.beta), schedule=schedules.OPDSchedule(kind="constant"),
                native_prompts=0, cross_prompts=rl.native_prompts + rl.cross_prompts,
                cross_outcome_reward=rl.mopd.cross_outcome_reward)
