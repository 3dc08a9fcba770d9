"""Behavioural diagnostics between branches (not losses): top-k overlap, symmetric KL and,
on the toy suite, the rate of flawed-procedure answers.

Overlap, the paper's definition: O(student, teacher) = mean over the student's on-policy
states s of |TopK(pi_student(.|s)) & TopK(pi_teacher(.|s))| / K, K = 10. The states are
the prefixes of the student's own rollouts (every response position).

The prompts are FIXED (fixed_prompts): the same items, and the same sampling keys, at every
diagnostic step and in every run of the same task suite (any cfg.seed, any method whose
branch has that data domain), so a change between two steps or two runs is the policy's,
not the draw's (the measurements pair up).
"""

from __future__ import annotations

import functools
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax import kernels
from copd_jax.data import toy_flaws, toy_tasks
from copd_jax.data.examples import Example
from copd_jax.models import lora, model_config
from copd_jax.models.policy import Policy, policy_of
from copd_jax.rl import rows as rows_lib

# The diagnostics' own train stream: cfg.tasks.seed + this (training's streams use
# cfg.tasks.seed + 1000 * cfg.seed + a small offset, so they never meet it).
DIAGNOSTIC_STREAM_SEED = 9_999_000


def domain_tag(capabilities: Sequence[str]) -> int:
  """A stable 32-bit number for a branch's data domain ('text', 'text+image+video')."""
  return zlib.crc32("+".join(capabilities).encode())


def fixed_prompts(task_seed: int, domains: Sequence[Sequence[str]], n: int,
                  draw: Callable[[int, Sequence[str], int, np.random.Generator], list[Example]]
                  ) -> list[list[Example]]:
  """The diagnostic prompts: n examples per branch domain, the same at every step and in
  every run (they depend on the task seed and the domain only, not on cfg.seed, the
  step or the other branches).

  draw(stream_seed, capabilities, n, rng) -> n examples from fresh train streams of
  that seed (loop.py: rollout.draw_examples on a new data context). Returns [S][n]."""
  return [draw(task_seed + DIAGNOSTIC_STREAM_SEED, tuple(caps), n,
               np.random.default_rng([task_seed, 99, domain_tag(caps)])) for caps in domains]


def fixed_sampling_keys(task_seed: int, domains: Sequence[Sequence[str]]) -> jax.Array:
  """One sampling key per branch, from its domain alone: key[S] (common random numbers,
  so two steps or runs sample their fixed prompts with the same noise)."""
  base = jax.random.key(task_seed)
  return jnp.stack([jax.random.fold_in(base, domain_tag(caps) & 0x7FFFFFFF) for caps in domains])


def is_toy_example(example: Example) -> bool:
  """A toy-suite item (its flawed procedure is known): a task family with a worked trace."""
  return (example.capability in toy_tasks.FAMILIES and example.verifier == "integer"
          and bool(example.solution))


def answer_rates(examples: Sequence[Example], responses: Sequence[str]) -> dict | None:
  """{'flawed_rate', 'flaw_judged', 'correct_rate'} of one branch's answers to its fixed
  prompts (toy_flaws.flawed_answer_rate: among the items whose flawed answer differs from
  the reference; correct_rate among all), or None when any item is not a toy-suite one."""
  if not examples or not all(is_toy_example(ex) for ex in examples):
    return None
  rate, judged = toy_flaws.flawed_answer_rate(examples, responses)
  correct = np.mean([toy_flaws.classify_response(ex, r) == toy_flaws.CORRECT
                     for ex, r in zip(examples, responses)])
  return {"flawed_rate": rate, "flaw_judged": float(judged), "correct_rate": float(correct)}


def top_k_overlap(ids_a, ids_b, mask):
  """|A & B| / K averaged over masked states.

  ids_a, ids_b: int32[..., K] (each row's K distinct token ids); mask: f32/bool[...].
  Returns f32[] (0 when nothing is masked in).
  """
  k = ids_a.shape[-1]
  shared = jnp.any(ids_a[..., :, None] == ids_b[..., None, :], axis=-1).sum(-1) / k
  m = mask.astype(jnp.float32)
  return jnp.sum(shared * m) / jnp.maximum(m.sum(), 1.0)


def masked_mean(values, mask):
  m = mask.astype(jnp.float32)
  return jnp.sum(values * m) / jnp.maximum(m.sum(), 1.0)


def _rows_hidden(params, policy: Policy, tokens, positions, token_mask, frames,
                 prompt_len: int):
  """Hidden states of one student's rows [N, T] under one model: f32[N, T, D] over every
  column; for a policy that needs_prompt_len (Qwen3-VL) f32[N, T - P, D] over the loss
  columns (rows.loss_columns), each row's prompt and media run once and the response
  continues from the prompt's positions."""
  if not policy.needs_prompt_len:
    return policy.rows_hidden(params, tokens, positions, token_mask, frames)
  p = prompt_len
  prompt_hidden, hidden = policy.shared_prefix_hidden(
      params, tokens[:, :p], positions[:, :p], token_mask[:, :p], frames, tokens[:, p:],
      positions[:, p:])
  return jnp.concatenate([prompt_hidden[:, -1:], hidden[:, :-1]], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "k", "kernel", "prompt_len"))
def pairwise_diagnostics(models, cfg: model_config.ModelConfig | Policy, tokens,
                         positions, token_mask, response_mask, frames, *, k: int = 10,
                         kernel: kernels.KernelConfig = kernels.KernelConfig(),
                         prompt_len: int = 0):
  """Overlap and symmetric KL of every model with every student on the student's states.

  models: stacked params [M] (e.g. the E branches, optionally the base appended);
  tokens, positions: int32[S, N, T], token_mask: bool[S, N, T], response_mask: f32[S, N, T]
  (1 at t when t+1 is a response token), frames: f32[S, N, F, H, W, C] — the rollouts of
  S students, which are models[0:S]. Qwen3-VL rows (frames: PromptMedia [S, N]) need
  prompt_len P, the prompt columns of the rows.
  Returns {'overlap': f32[S, M], 'sym_kl': f32[S, M]}; entry [s, m] compares student s
  with model m on student s's own rollouts (the diagonal is 1 and 0).
  """
  policy = policy_of(cfg)
  vl = policy.needs_prompt_len
  if vl and not prompt_len:
    raise ValueError("Qwen3-VL rows need prompt_len (their prompt columns)")
  heads = jax.vmap(policy.lm_head, in_axes=(lora.branch_axes(models),))(models)

  def hidden_of(params):  # one model on every student's rows -> [S, N, W, D]
    return jax.vmap(lambda t, p, m, f: _rows_hidden(params, policy, t, p, m, f, prompt_len))(
        tokens, positions, token_mask, frames)

  # [M, S, N, W, D]; map keeps memory at one model (LoRA: over the adapters, one base).
  hidden = jax.lax.map(lambda t: hidden_of(lora.with_trainable(models, t)),
                       lora.trainable(models))
  if vl:  # the states are the loss columns
    targets = tokens[..., prompt_len:]
    response_mask = response_mask[..., prompt_len - 1:-1]
  else:
    targets = jax.vmap(rows_lib.next_token_targets)(tokens)

  def top_ids(h, head):
    return kernels.sampled_token_logprobs(h, head, targets, kernel=kernel, top_k=k).top_k_ids

  ids = jax.vmap(top_ids)(hidden, heads)  # [M, S, N, T, k]
  num_students = tokens.shape[0]
  student_ids = ids[jnp.arange(num_students), jnp.arange(num_students)]  # [S, N, T, k]
  student_hidden = hidden[jnp.arange(num_students), jnp.arange(num_students)]
  student_heads = heads[:num_students]

  overlap = jax.vmap(lambda ids_m: jax.vmap(top_k_overlap)(student_ids, ids_m, response_mask))(ids)

  def sym_kl(h_m, head_m):  # [S] for one model m against every student
    def one(h_s, head_s, h_ms, mask):
      forward = kernels.full_vocab_reverse_kl(h_s, head_s, h_ms, head_m, kernel=kernel)
      backward = kernels.full_vocab_reverse_kl(h_ms, head_m, h_s, head_s, kernel=kernel)
      return masked_mean(forward + backward, mask)
    return jax.vmap(one)(student_hidden, student_heads, h_m, response_mask)

  kl = jax.vmap(sym_kl)(hidden, heads)  # [M, S]
  return {"overlap": overlap.T, "sym_kl": kl.T}
