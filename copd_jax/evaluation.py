"""Held-out accuracy per capability: greedy decoding, host-side verification."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from copd_jax import parallel, policy_setup, sampling, tasks, verifiers
from copd_jax.policy_setup import RunSetup


def decode_responses(rollout_tokens: np.ndarray, rollout_mask: np.ndarray, tokenizer) -> list[str]:
  """tokens, mask: [N, R] -> N response strings (tokens outside the mask dropped)."""
  return [tokenizer.decode([int(t) for t, m in zip(row, mask_row) if m])
          for row, mask_row in zip(rollout_tokens, rollout_mask)]


def _pad_to(examples: Sequence[tasks.Example], size: int) -> list[tasks.Example]:
  # A fixed batch shape means one compilation; padded rows are dropped afterwards.
  return list(examples) + [examples[-1]] * (size - len(examples))


def greedy_responses_stacked(stacked: Any, setup: RunSetup, examples: Sequence[tasks.Example],
                             max_new_tokens: int, batch_size: int) -> list[list[str]]:
  """Every branch of a stacked pytree answers the same examples, one vmapped call per
  batch. Returns responses[branch][example]."""
  sampling_cfg = sampling.SamplingConfig(
      max_new_tokens=max_new_tokens, greedy=True, stop_token_ids=(setup.tokenizer.eos_id,),
      banned_token_ids=policy_setup.never_generated_ids(setup.tokenizer))
  num = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  out: list[list[str]] = [[] for _ in range(num)]
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    batch = setup.encode_prompts(_pad_to(chunk, batch_size))
    tile = lambda x: None if x is None else np.broadcast_to(x, (num,) + x.shape)
    rollout = sampling.stacked_generate(
        stacked, setup.model_cfg, tile(batch.tokens), tile(batch.mask), tile(batch.frames),
        jax.random.split(jax.random.key(0), num), sampling_cfg, 1)
    rollout = parallel.to_host((rollout.tokens, rollout.mask))  # global arrays on a mesh
    tokens = np.asarray(rollout[0])[:, : len(chunk), 0]
    mask = np.asarray(rollout[1])[:, : len(chunk), 0]
    for k in range(num):
      out[k] += decode_responses(tokens[k], mask[k], setup.tokenizer)
  return out


def evaluate_stacked(stacked: Any, setup: RunSetup, eval_sets: dict[str, list], *,
                     max_new_tokens: int, batch_size: int, with_rewards: bool = False):
  """Held-out accuracy of every branch: {'accuracy/<cap>', 'accuracy/overall',
  'response_chars/<cap>'}, each f32[S].

  with_rewards=True also returns the per-example rewards {cap: f32[S, N]} (same order as
  eval_sets[cap]), which paired comparisons between methods need: (metrics, rewards)."""
  metrics, rewards = {}, {}
  for cap, examples in eval_sets.items():
    responses = greedy_responses_stacked(stacked, setup, examples, max_new_tokens, batch_size)
    # Each example names its verifier (integer for the toy suite; math / choice / exact
    # for records).
    rewards[cap] = np.stack([verifiers.rewards_for(r, examples) for r in responses]).astype(
        np.float32)
    metrics[f"accuracy/{cap}"] = rewards[cap].mean(axis=1)
    metrics[f"response_chars/{cap}"] = np.array(
        [np.mean([len(x) for x in r]) for r in responses], np.float32)
  metrics["accuracy/overall"] = np.mean([metrics[f"accuracy/{c}"] for c in eval_sets], axis=0)
  return (metrics, rewards) if with_rewards else metrics


def save_eval_rewards(path: str, rewards_by_model: dict[str, dict[str, np.ndarray]]) -> None:
  """Writes {model name: {cap: f32[N]}} as an .npz with keys '<model>/<cap>' (0/1 per
  held-out example, in eval-set order), for paired comparisons across runs."""
  flat = {f"{name}/{cap}": np.asarray(r, np.float32)
          for name, per_cap in rewards_by_model.items() for cap, r in per_cap.items()}
  np.savez_compressed(path, **flat)


def evaluate(params: Any, setup: RunSetup, eval_sets: dict[str, list], *,
             max_new_tokens: int, batch_size: int) -> dict[str, float]:
  """One policy: {'accuracy/<cap>', 'accuracy/overall', 'response_chars/<cap>'} floats."""
  stacked = jax.tree.map(lambda x: x[None], params)
  metrics = evaluate_stacked(stacked, setup, eval_sets, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
  return {k: float(v[0]) for k, v in metrics.items()}
