"""The stage loop's contract (loop.train_loop), pinned to a hand-written trace.

A fake trainer and recording hooks stand in for the real ones, so the order is read off
the calls themselves: every hook's start() once before the first step of a fresh stage
(never on a resumed one), then per step the trainer's step with that step's OPD weight
from the schedule, then every hook's after_step() in list order with run.step and the
run's global step already advanced, and the step's new state stored before the hooks
see it. A hook that must see a step's result (a checkpoint, the log) would read stale
state if the loop called it before storing the step; a schedule read at the wrong index
would distil on RL steps.
"""
import dataclasses
import types

import numpy as np
import pytest

from copd_jax.rl import loop, schedules
from copd_jax.rl.hooks import StageRun, UpdateCounts
from copd_jax.rl.step import TrainState

# Cycles of 2 RL steps then 1 OPD step: weights 0, 0, 1, 0, 0, 1 for steps 0..5.
SCHEDULE = schedules.OPDSchedule(kind="cycle", s_rl=2, s_opd=1)


@dataclasses.dataclass
class FakeTrainer:
  """Records step(state, step, weight, rng); its new state is the step index + 1."""
  stage: object
  events: list

  def step(self, state, step, weight, rng):
    self.events.append(("step", step, weight, state.params))
    return types.SimpleNamespace(state=TrainState(params=step + 1, opt_state=None))


@dataclasses.dataclass
class RecordingHook:
  name: str
  events: list
  ctx: object

  def start(self, run):
    self.events.append(("start", self.name, run.step, run.state.params))

  def after_step(self, run, result):
    assert result.state is run.state  # the step's state is stored before any hook runs
    self.events.append((self.name, run.step, self.ctx.global_step, run.state.params))


def loop_trace(steps: int, start_step: int, global_step: int):
  events = []
  ctx = types.SimpleNamespace(global_step=global_step)
  stage = types.SimpleNamespace(name="s", steps=steps, schedule=SCHEDULE)
  run = StageRun(TrainState(params=start_step, opt_state=None), start_step,
                 np.random.default_rng(0), schedules.ScheduleState(), UpdateCounts.zeros(1))
  hooks = [RecordingHook(name, events, ctx) for name in ("log", "diagnostics", "checkpoint")]
  loop.train_loop(ctx, FakeTrainer(stage, events), run, hooks)
  return events, run, ctx


def test_fresh_stage_calls_start_hooks_then_steps_with_hooks_in_order():
  events, run, ctx = loop_trace(steps=3, start_step=0, global_step=10)
  assert events == [
      ("start", "log", 0, 0), ("start", "diagnostics", 0, 0), ("start", "checkpoint", 0, 0),
      ("step", 0, 0.0, 0),
      ("log", 1, 11, 1), ("diagnostics", 1, 11, 1), ("checkpoint", 1, 11, 1),
      ("step", 1, 0.0, 1),
      ("log", 2, 12, 2), ("diagnostics", 2, 12, 2), ("checkpoint", 2, 12, 2),
      ("step", 2, 1.0, 2),  # the cycle's OPD step
      ("log", 3, 13, 3), ("diagnostics", 3, 13, 3), ("checkpoint", 3, 13, 3),
  ]
  assert (run.step, run.state.params, ctx.global_step) == (3, 3, 13)


def test_resumed_stage_skips_start_hooks_and_continues_at_its_step():
  events, run, ctx = loop_trace(steps=6, start_step=4, global_step=20)
  assert events == [
      ("step", 4, 0.0, 4),
      ("log", 5, 21, 5), ("diagnostics", 5, 21, 5), ("checkpoint", 5, 21, 5),
      ("step", 5, 1.0, 5),
      ("log", 6, 22, 6), ("diagnostics", 6, 22, 6), ("checkpoint", 6, 22, 6),
  ]
  assert (run.step, ctx.global_step) == (6, 22)


def test_a_finished_stage_steps_no_more():
  events, run, _ = loop_trace(steps=2, start_step=2, global_step=5)
  assert events == [] and run.step == 2


def test_a_hook_error_stops_the_loop_after_that_step():
  events = []
  ctx = types.SimpleNamespace(global_step=0)
  stage = types.SimpleNamespace(name="s", steps=4, schedule=SCHEDULE)
  run = StageRun(TrainState(0, None), 0, np.random.default_rng(0), schedules.ScheduleState(),
                 UpdateCounts.zeros(1))

  class Stop(RecordingHook):
    def after_step(self, run, result):
      super().after_step(run, result)
      if run.step == 2:
        raise KeyboardInterrupt("preempted")
  with pytest.raises(KeyboardInterrupt):
    loop.train_loop(ctx, FakeTrainer(stage, events), run,
                    [Stop("preemption", events, ctx)])
  assert [e for e in events if e[0] == "step"] == [("step", 0, 0.0, 0), ("step", 1, 0.0, 1)]
  assert run.step == 2


def test_run_stage_hooks_log_first_and_save_before_preempting():
  """The real hook list: the log counts the step before anything reads the counts; the
  checkpoint is written before a preemption raises (else a SIGTERM would lose the step);
  without checkpoints neither is installed."""
  from copd_jax.rl import hooks as hooks_lib
  cfg = types.SimpleNamespace(rl=types.SimpleNamespace(eval_examples=2, log_every=1))
  ctx = types.SimpleNamespace(cfg=cfg, eval_sets={"text": [1, 2, 3]})
  stage = types.SimpleNamespace(name="s", steps=4, teacher_data=(("text",),),
                                student_data=(("text",),))
  kinds = [type(h) for h in loop.stage_hooks(ctx, stage, 0, (object(), {}), False)]
  assert kinds == [hooks_lib.StepLog, hooks_lib.Diagnostics, hooks_lib.Evaluation,
                   hooks_lib.Checkpointing, hooks_lib.Preemption]
  kinds = [type(h) for h in loop.stage_hooks(ctx, stage, 0, None, False)]
  assert kinds == [hooks_lib.StepLog, hooks_lib.Diagnostics, hooks_lib.Evaluation]
