"""The host half of a step: draw prompts, sample G responses per prompt from every
student (one vmapped sampler call), verify them, and build the update's typed batch (Rows)
with group-normalised advantages and each cross row's teacher beta (StageRollout).
Each process loads and verifies only the prompts its devices hold."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax import sampling
from copd_jax.data import examples as examples_lib, reward_fns
from copd_jax.data.examples import decode_responses
from copd_jax.rl import objectives, rows as rows_lib, schedules
from copd_jax.rl.rows import Rows
from copd_jax.rl.stages import NATIVE, NO_TEACHER, Stage

Params = Any


@dataclasses.dataclass
class DataContext:
  """What the host loop needs to draw and encode prompts."""
  tokenizer: Any
  encode_prompts: Callable[[Sequence[examples_lib.Example]], examples_lib.PromptBatch]
  # One endless train stream per capability with reserve() / load(index) (data.IndexedStream).
  streams: dict[str, Any]
  sampling: sampling.SamplingConfig
  rewards: reward_fns.Rewards = reward_fns.Rewards()  # how responses are scored


ExampleRef = tuple[str, int]  # (capability, index in its stream): an example not yet loaded


def draw_refs(data: DataContext, capabilities: Sequence[str], n: int,
              rng: np.random.Generator) -> list[ExampleRef]:
  """n positions in the train streams, each of a capability drawn uniformly from
  `capabilities`. Reserving advances the streams without loading anything."""
  picks = rng.integers(0, len(capabilities), size=n)
  return [(capabilities[i], data.streams[capabilities[i]].reserve()) for i in picks]


def load_example(data: DataContext, ref: ExampleRef) -> examples_lib.Example:
  capability, index = ref
  return data.streams[capability].load(index)


def draw_examples(data: DataContext, capabilities: Sequence[str], n: int,
                  rng: np.random.Generator) -> list[examples_lib.Example]:
  """n training examples, each from a capability drawn uniformly from `capabilities`."""
  return [load_example(data, ref) for ref in draw_refs(data, capabilities, n, rng)]


def stage_prompts(stage: Stage, data: DataContext, distil: bool, assignment: np.ndarray,
                  rng: np.random.Generator) -> tuple[list[list[ExampleRef]], np.ndarray]:
  """The prompts each student samples on this step, native first then cross, as stream
  positions (every process reserves the same global batch).

  Returns (refs[S][B_native (+ B_cross)], row_kind int32[S, B]: NATIVE, NO_TEACHER or the
  teacher index j of a cross prompt).
  """
  per_student, teachers = [], []
  for k, caps in enumerate(stage.student_data):
    refs = draw_refs(data, caps, stage.native_prompts, rng) if stage.native_prompts else []
    row_teacher = [NATIVE] * len(refs)
    if distil:
      for j in assignment[k]:
        # A student without teachers still fills its rows (masked out) to keep shapes.
        domain = stage.teacher_data[j] if j >= 0 else (caps or stage.teacher_data[0])
        refs.append(draw_refs(data, domain, 1, rng)[0])
        row_teacher.append(int(j))
    per_student.append(refs)
    teachers.append(row_teacher)
  return per_student, np.asarray(teachers, np.int32)


def load_local_examples(data: DataContext, refs: Sequence[Sequence[ExampleRef]],
                        local: np.ndarray) -> list[list[examples_lib.Example]]:
  """Loads the examples of the prompts this process holds (local: bool[S, B]). The other
  slots get a stand-in (one of the loaded examples): their encoded arrays are never read,
  because only a process's own shards go to its devices (sharding.put_global)."""
  loaded = {(k, b): load_example(data, ref) for k, row in enumerate(refs)
            for b, ref in enumerate(row) if local[k, b]}
  stand_in = next(iter(loaded.values()))
  return [[loaded.get((k, b), stand_in) for b in range(len(row))] for k, row in enumerate(refs)]


def verify_local(responses_of, examples, local_rows: np.ndarray,
                 stats: dict | None = None,
                 rewards_fn: reward_fns.Rewards = reward_fns.Rewards()) -> np.ndarray:
  """Rewards f32[S, B*G] of the whole batch, each process verifying only its own rows.

  responses_of(rows) -> response strings of flat row indices; examples[S][B*G] (stand-ins
  outside local_rows); local_rows: bool[S, B*G]. Other processes' rewards arrive through
  one small all-gather; single-process runs verify everything locally. `stats`, if given,
  receives this process's verify/timeouts, verify/over_budget and verify/memory_exceeded
  counts (answers that scored 0 because of the per-answer limit, the step budget or a
  worker's memory limit, config.reward) and reward/errors (responses whose reward
  plug-in failed; past config.reward.max_error_fraction score raises RewardFunctionError),
  and with several reward functions (config.reward.fns) each one's mean over this
  process's rows of every branch, `reward_fn/<name>` f32[S]. rewards_fn: the run's
  Rewards (config.reward)."""
  s, n = local_rows.shape
  flat = np.flatnonzero(local_rows.reshape(-1))
  rewards = np.zeros(s * n, np.float32)
  rewards[flat], per_fn, calls = rewards_fn.score(responses_of(flat),
                                                  [examples[i // n][i % n] for i in flat])
  pool = reward_fns.total_stats(calls)
  if stats is not None:
    stats.update({"verify/timeouts": float(pool.timeouts),
                  "verify/over_budget": float(pool.over_budget),
                  "verify/memory_exceeded": float(pool.memory_exceeded),
                  "reward/errors": float(pool.errors)})
    stats.update(reward_fns.branch_means(per_fn, flat, s, n))
  rewards = rewards.reshape(s, n)
  if jax.process_count() == 1:
    return rewards
  from jax.experimental import multihost_utils
  every_r, every_m = multihost_utils.process_allgather((rewards, local_rows))  # [P, S, B*G]
  # A row held by several processes (replicated) was verified identically by each.
  return (every_r * every_m).sum(0) / np.maximum(every_m.sum(0), 1)


def stack_prompt_batches(batches: Sequence[examples_lib.PromptBatch]) -> sampling.Prompts:
  """Per-student PromptBatches -> the students' sampling.Prompts: tokens [S, B, P], mask
  [S, B, P], media: frames [S, B, F, H, W, C] -- or Qwen3-VL's PromptMedia [S, B, ...],
  or None for a text-only model."""
  frames = jax.tree.map(lambda *parts: np.stack(parts), *[b.frames for b in batches])
  return sampling.Prompts(np.stack([b.tokens for b in batches]),
                          np.stack([b.mask for b in batches]), frames)


def group_advantages(rewards: np.ndarray, samples: int, scale_by_std: bool) -> tuple[np.ndarray, np.ndarray]:
  """rewards f32[S, B*G] -> (advantages f32[S, B*G], zero-variance flags bool[S, B])."""
  s, n = rewards.shape
  grouped = rewards.reshape(s * n // samples, samples)
  adv = objectives.grpo_advantages(grouped, scale_by_std=scale_by_std)
  zero = np.asarray(adv.zero_variance).reshape(s, -1)
  return np.asarray(adv.advantages).reshape(s, n), zero


def build_rows(prompts: sampling.Prompts, rollout: sampling.Rollout, advantages,
               opd_beta) -> Rows:
  """Stacked prompts [S, B, P] + their rollout [S, B, G, R] -> Rows [S, B*G, P+R] with
  prompt_len P; advantages, opd_beta: f32[S, B*G].

  prompts.media: the prompts' media [S, B, ...] (the toy's frames, or Qwen3-VL's
  PromptMedia), repeated for each prompt's G rows; or None."""
  prompt_len, samples = prompts.tokens.shape[-1], rollout.tokens.shape[2]
  tokens, positions, token_mask, response_mask = jax.vmap(rows_lib.rollout_to_sequences)(
      prompts.tokens, prompts.mask, rollout)
  old = jax.vmap(rows_lib.align_response_values, in_axes=(0, None))(
      rollout.raw_logprobs, prompt_len)
  return Rows(tokens=tokens, positions=positions, token_mask=token_mask,
              response_mask=response_mask, old_logprobs=old,
              advantages=jnp.asarray(advantages, jnp.float32),
              opd_beta=jnp.asarray(opd_beta, jnp.float32),
              frames=jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), samples, axis=1),
                                  prompts.media),
              prompt_len=int(prompt_len))


def completion_samples(got: "Rollouts", per_kind: int) -> list[dict]:
  """The first sample of the first `per_kind` native and `per_kind` cross prompts of every
  branch that this process holds, from a step's rollouts: {'branch' (index), 'row'
  ('native' | 'cross'), 'teacher' (index, or None), 'prompt', 'answer', 'response',
  'reward'} (got.examples[S][B]; got.row_teacher, got.local: [S, B]; got.rewards
  f32[S, B*G]; got.responses_of decodes rows of the [S*B*G] rollout)."""
  row_teacher, local, examples = got.row_teacher, got.local, got.examples
  s_count, b_count = row_teacher.shape
  g = got.rewards.shape[1] // b_count  # B*G // B
  out = []
  for s in range(s_count):
    for kind, is_kind in (("native", row_teacher[s] == NATIVE), ("cross", row_teacher[s] >= 0)):
      picked = [b for b in np.flatnonzero(is_kind & local[s])][:per_kind]
      if not picked:
        continue
      rows = [(s * b_count + b) * g for b in picked]
      for b, row, response in zip(picked, rows, got.responses_of(np.array(rows))):
        ex = examples[s][b]
        out.append({"branch": s, "row": kind,
                    "teacher": int(row_teacher[s, b]) if kind == "cross" else None,
                    "prompt": ex.question, "answer": str(ex.answer), "response": response,
                    "reward": float(got.rewards[s, b * g])})
  return out


@dataclasses.dataclass
class Rollouts:
  """One step's scored rollouts of every student, ready for the update (StageRollout).

  rows: Rows [S, B*G, P + R] (rows.prompt_len = P); distil: whether this step distils
  (rows carry teacher betas); rewards f32[S, B*G]; is_native / is_cross bool[S, B*G];
  zero_variance bool[S, B] (groups with equal rewards); examples [S][B]; row_teacher,
  local [S, B] (see stage_prompts / load_local_examples); responses_of(flat row indices)
  decodes rows of the [S*B*G] rollout; rollout_tokens: response tokens sampled;
  timings: seconds of sampling and verification (StageTrainer.step adds the update's);
  verify_stats: the verifier's counters (verify_local)."""
  rows: Rows
  distil: bool
  rewards: np.ndarray
  is_native: np.ndarray
  is_cross: np.ndarray
  zero_variance: np.ndarray
  examples: list
  row_teacher: np.ndarray
  local: np.ndarray
  responses_of: Callable
  rollout_tokens: int
  timings: dict
  verify_stats: dict

  @property
  def prompt_len(self) -> int:
    """P: the prompt columns of the rows."""
    return self.rows.prompt_len


@dataclasses.dataclass(frozen=True, eq=False)
class StageRollout:
  """The host half of a stage's step, built once per stage (rl.step.StageTrainer):
  `collect_rollouts(params, step, weight, rng) -> Rollouts` draws prompts, samples G responses per
  prompt from every student, verifies them, and builds the rows with their advantages and
  teacher betas.

  stage: who samples which data; data: where prompts come from; run: the run's
  sharding.RunSharding (the sampler runs on its mesh, rollouts come back to the host);
  model_cfg: the students' model config; key: the stage's PRNG key (step k samples with
  fold_in(key, k)); assignment int32[S, B_cross]: each cross prompt's teacher
  (stages.cross_teacher_assignment); scale_by_std: GRPO (True) or Dr.GRPO (False)."""
  stage: Stage
  data: DataContext
  run: Any
  model_cfg: Any
  key: Any
  assignment: np.ndarray
  scale_by_std: bool = True

  def collect_rollouts(self, params: Params, step: int, weight: float,
                       rng: np.random.Generator) -> Rollouts:
    """params: the students' stacked params [S, ...]; step: the step index within the
    stage; weight: the step's OPD weight; rng: the host RNG that draws prompts (advanced
    in place)."""
    distil = self.stage.distils and weight > 0
    t0 = time.perf_counter()
    drawn = self._draw(distil, rng)
    rollout = self._sample(params, drawn.prompts, step)
    timings = {"time/sample_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    got = self._score(drawn, rollout, weight, distil)
    timings["time/verify_s"] = time.perf_counter() - t1
    return dataclasses.replace(got, timings=timings)

  def _draw(self, distil: bool, rng: np.random.Generator) -> "DrawnPrompts":
    refs, row_teacher = stage_prompts(self.stage, self.data, distil, self.assignment, rng)
    # Each process loads (and later verifies) only the prompts its devices hold.
    local = self.run.local_prompt_mask(row_teacher.shape)
    examples = load_local_examples(self.data, refs, local)
    batches = [self.data.encode_prompts(ex) for ex in examples]
    return DrawnPrompts(examples, row_teacher, local, stack_prompt_batches(batches))

  @property
  def sampler(self) -> sampling.Sampler:
    """The stage's sampler: the students' policy, the data's settings, G per prompt."""
    return sampling.Sampler(self.model_cfg, self.data.sampling, self.stage.samples_per_prompt)

  def _sample(self, params: Params, prompts: sampling.Prompts, step: int) -> sampling.Rollout:
    """prompts [S, B, P] -> the rollout [S, B, G, R] as host arrays."""
    keys = jax.random.split(jax.random.fold_in(self.key, step), self.stage.num_students)
    return self.run.to_host(sampling.stacked_generate(self.run, params, self.sampler,
                                                      prompts, keys))

  def _score(self, drawn: "DrawnPrompts", rollout: sampling.Rollout, weight: float,
             distil: bool) -> Rollouts:
    stage, g = self.stage, self.stage.samples_per_prompt
    s, b = drawn.row_teacher.shape
    tokens, masks = rollout.tokens.reshape(s * b * g, -1), rollout.mask.reshape(s * b * g, -1)
    tokenizer = self.data.tokenizer
    responses_of = lambda rows: decode_responses(tokens[rows], masks[rows], tokenizer)
    # Each example names its verifier (integer for the toy tasks; math / choice / exact
    # for record datasets).
    rewarded = [[ex for ex in exs for _ in range(g)] for exs in drawn.examples]  # [S][B*G]
    verify_stats = {}
    rewards = verify_local(responses_of, rewarded, np.repeat(drawn.local, g, axis=1),
                           verify_stats, self.data.rewards)
    advantages, zero_variance = group_advantages(rewards, g, self.scale_by_std)
    row_teacher_g = np.repeat(drawn.row_teacher, g, axis=1)  # [S, B*G]
    is_native, is_cross = row_teacher_g == NATIVE, row_teacher_g >= 0
    if not stage.cross_outcome_reward:
      advantages = np.where(is_native, advantages, 0.0)
    beta = schedules.teacher_matrix(stage.topology, stage.branch_beta, weight)  # [S, J]
    opd_beta = np.where(is_cross, beta[np.arange(s)[:, None], np.maximum(row_teacher_g, 0)],
                        0.0)
    rows = build_rows(drawn.prompts, rollout, advantages, opd_beta)
    if distil:
      # Cross slots of students without a teacher carry nothing: mask them out.
      dead = jnp.asarray(row_teacher_g == NO_TEACHER)
      rows.response_mask = jnp.where(dead[..., None], 0.0, rows.response_mask)
    return Rollouts(rows, distil, rewards, is_native, is_cross, zero_variance, drawn.examples,
                    drawn.row_teacher, drawn.local, responses_of,
                    int(np.asarray(rollout.lengths).sum()), {}, verify_stats)


@dataclasses.dataclass
class DrawnPrompts:
  """One step's prompts: examples [S][B] (stand-ins outside `local`), row_teacher and
  local [S, B] (stage_prompts / load_local_examples) and the encoded prompts
  (sampling.Prompts [S, B, P], stack_prompt_batches)."""
  examples: list
  row_teacher: np.ndarray
  local: np.ndarray
  prompts: sampling.Prompts
