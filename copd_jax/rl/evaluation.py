"""Held-out accuracy per capability: greedy decoding, host-side verification; pass@k from
n sampled responses per prompt with the unbiased estimator (Chen et al., 2021).

What a pass is: a sample passes when its reward is at least `pass_threshold`
(config.eval.pass_threshold, default 1.0: a fully correct answer). A partial-credit reward
(a plug-in's 0.5, or a weighted list of rewards, config.reward.fns) does not pass unless the
threshold is lowered to it. Greedy `accuracy` is the mean reward, partial credit included."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np

from copd_jax import sampling, sharding as sharding_lib
from copd_jax.data import examples as examples_lib
from copd_jax.data.examples import decode_responses
from copd_jax.models import stacked as stacked_lib
from copd_jax.policy_setup import RunSetup


def _pad_to(examples: Sequence[examples_lib.Example], size: int) -> list[examples_lib.Example]:
  # A fixed batch shape means one compilation; padded rows are dropped afterwards.
  return list(examples) + [examples[-1]] * (size - len(examples))


def _tile(tree, num: int):
  """Every array of a prompt batch's field (tokens, or the media pytree) repeated for
  `num` branches on a new leading axis (a broadcast view, no copy); None stays None."""
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num,) + np.shape(x)), tree)


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k estimate from n samples of which c are correct:
  1 - C(n-c, k) / C(n, k), the chance that k of the n samples, drawn without replacement,
  hold at least one correct one. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never
  forms the (huge) binomials. E.g. pass_at_k(4, 1, 2) = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct_counts: np.ndarray, n: int, k: int) -> np.ndarray:
  """correct_counts int[S, E] (branch, example) of n samples each -> f32[S]: pass@k
  averaged over the examples."""
  counts = np.asarray(correct_counts)
  return np.array([[pass_at_k(n, int(c), k) for c in row] for row in counts],
                  np.float64).mean(axis=1).astype(np.float32)


def passing_counts(rewards: np.ndarray, pass_threshold: float = 1.0) -> np.ndarray:
  """rewards f32[E, n] (n samples of each of E examples) -> int[E]: how many samples pass,
  i.e. score at least pass_threshold. E.g. [[1.0, 0.5], [0.5, 0.0]] -> [1, 0] at 1.0,
  [2, 1] at 0.5."""
  return (np.asarray(rewards) >= pass_threshold).sum(axis=-1)


def sampled_correct_counts(stacked: Any, setup: RunSetup, examples: Sequence[examples_lib.Example], *,
                           run: sharding_lib.RunSharding, num_samples: int, temperature: float,
                           max_new_tokens: int, batch_size: int, seed: int = 0,
                           pass_threshold: float = 1.0) -> np.ndarray:
  """Every branch samples `num_samples` responses per example (full vocabulary at
  `temperature`); returns int[S, E]: how many of each example's samples pass (reward >=
  pass_threshold, see passing_counts).
  Prompts per sampler call: batch_size // num_samples (at least 1), so a call holds about
  batch_size rows."""
  sampling_cfg = sampling.SamplingConfig(
      max_new_tokens=max_new_tokens, temperature=temperature,
      stop_token_ids=(setup.tokenizer.eos_id,),
      banned_token_ids=setup.banned_token_ids)
  sampler = sampling.Sampler(setup.model_cfg, sampling_cfg, num_samples)
  num = stacked_lib.num_experts(stacked)
  prompts_per_call = max(1, batch_size // num_samples)
  counts = np.zeros((num, len(examples)), np.int64)
  for start in range(0, len(examples), prompts_per_call):
    chunk = examples[start:start + prompts_per_call]
    batch = setup.encode_prompts(_pad_to(chunk, prompts_per_call))
    tile = functools.partial(_tile, num=num)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), start), num)
    prompts = sampling.Prompts(tile(batch.tokens), tile(batch.mask), tile(batch.frames))
    rollout = sampling.stacked_generate(run, stacked, sampler, prompts, keys)
    tokens, mask = run.to_host((rollout.tokens, rollout.mask))
    tokens = np.asarray(tokens)[:, : len(chunk)]  # [S, B, G, R]
    mask = np.asarray(mask)[:, : len(chunk)]
    repeated = [ex for ex in chunk for _ in range(num_samples)]
    for k in range(num):
      responses = decode_responses(tokens[k].reshape(-1, tokens.shape[-1]),
                                   mask[k].reshape(-1, mask.shape[-1]), setup.tokenizer)
      rewards = setup.rewards.rewards_for(responses, repeated).reshape(len(chunk), num_samples)
      counts[k, start:start + len(chunk)] = passing_counts(rewards, pass_threshold)
  return counts


def greedy_responses_stacked(stacked: Any, setup: RunSetup, examples: Sequence[examples_lib.Example],
                             run: sharding_lib.RunSharding, max_new_tokens: int,
                             batch_size: int) -> list[list[str]]:
  """Every branch of a stacked pytree answers the same examples, one call of the training
  sampler (on run's mesh) per batch. Returns responses[branch][example]."""
  sampling_cfg = sampling.SamplingConfig(
      max_new_tokens=max_new_tokens, greedy=True, stop_token_ids=(setup.tokenizer.eos_id,),
      banned_token_ids=setup.banned_token_ids)
  sampler = sampling.Sampler(setup.model_cfg, sampling_cfg, 1)
  num = stacked_lib.num_experts(stacked)
  out: list[list[str]] = [[] for _ in range(num)]
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    batch = setup.encode_prompts(_pad_to(chunk, batch_size))
    tile = functools.partial(_tile, num=num)
    prompts = sampling.Prompts(tile(batch.tokens), tile(batch.mask), tile(batch.frames))
    rollout = sampling.stacked_generate(run, stacked, sampler, prompts,
                                        jax.random.split(jax.random.key(0), num))
    rollout = run.to_host((rollout.tokens, rollout.mask))  # global arrays on the mesh
    tokens = np.asarray(rollout[0])[:, : len(chunk), 0]
    mask = np.asarray(rollout[1])[:, : len(chunk), 0]
    for k in range(num):
      out[k] += decode_responses(tokens[k], mask[k], setup.tokenizer)
  return out


def evaluate_stacked(stacked: Any, setup: RunSetup, eval_sets: dict[str, list], *,
                     run: sharding_lib.RunSharding, max_new_tokens: int, batch_size: int,
                     pass_samples: int = 0,
                     pass_k: Sequence[int] = (), pass_temperature: float = 1.0,
                     pass_threshold: float = 1.0, responses_out: dict | None = None, rewards_out: dict | None = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
  """Held-out accuracy of every branch: {'accuracy/<cap>', 'accuracy/overall',
  'response_chars/<cap>'}, each f32[S], sampled on run's mesh (the run's RunSharding;
  methods.run_sharding, or sharding.RunSharding.one_device); with pass_samples = n > 0 also
  {'pass@<k>/<cap>', 'pass@<k>/overall'} for every k in pass_k (n samples per prompt at
  pass_temperature, unbiased estimator; a sample passes when its reward is at least
  pass_threshold). responses_out, if given, receives
  {cap: responses[branch][example]} of the greedy decoding (for completion logs);
  rewards_out, if given, receives the per-example rewards {cap: f32[S, N]} (eval-set
  order), which paired comparisons between methods need.
  progress, if given, is called with each capability's name once it is evaluated."""
  metrics = {}
  for cap, examples in eval_sets.items():
    responses = greedy_responses_stacked(stacked, setup, examples, run, max_new_tokens,
                                         batch_size)
    if responses_out is not None:
      responses_out[cap] = responses
    # Each example names its verifier (integer for the toy suite; math / choice / exact
    # for records).
    rewards = np.stack([setup.rewards.rewards_for(r, examples)
                        for r in responses]).astype(np.float32)
    if rewards_out is not None:
      rewards_out[cap] = rewards
    metrics[f"accuracy/{cap}"] = rewards.mean(axis=1)
    metrics[f"response_chars/{cap}"] = np.array(
        [np.mean([len(x) for x in r]) for r in responses], np.float32)
    if pass_samples:
      counts = sampled_correct_counts(stacked, setup, examples, run=run,
                                      num_samples=pass_samples,
                                      temperature=pass_temperature,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      pass_threshold=pass_threshold)
      for k in pass_k:
        metrics[f"pass@{k}/{cap}"] = mean_pass_at_k(counts, pass_samples, k)
    if progress is not None:
      progress(cap)
  metrics["accuracy/overall"] = np.mean([metrics[f"accuracy/{c}"] for c in eval_sets], axis=0)
  if pass_samples:
    for k in pass_k:
      metrics[f"pass@{k}/overall"] = np.mean([metrics[f"pass@{k}/{c}"] for c in eval_sets], axis=0)
  return metrics


def save_eval_rewards(path: str, rewards_by_model: dict[str, dict[str, np.ndarray]]) -> None:
  """Writes {model name: {cap: f32[N]}} as an .npz with keys '<model>/<cap>' (0/1 per
  held-out example, in eval-set order), for paired comparisons across runs."""
  flat = {f"{name}/{cap}": np.asarray(r, np.float32)
          for name, per_cap in rewards_by_model.items() for cap, r in per_cap.items()}
  np.savez_compressed(path, **flat)


def pass_at_k_kwargs(cfg) -> dict:
  """evaluate_stacked's pass@k arguments from config.eval (empty when pass_samples = 0)."""
  e = cfg.eval
  if not e.pass_samples:
    return {}
  return dict(pass_samples=int(e.pass_samples), pass_k=tuple(int(k) for k in e.pass_k),
              pass_temperature=float(e.pass_temperature),
              pass_threshold=float(e.pass_threshold))


def evaluate(params: Any, setup: RunSetup, eval_sets: dict[str, list], *,
             run: sharding_lib.RunSharding, max_new_tokens: int, batch_size: int,
             **kwargs) -> dict[str, float]:
  """One policy: {'accuracy/<cap>', 'accuracy/overall', 'response_chars/<cap>'} floats
  (and pass@k with evaluate_stacked's pass_* kwargs)."""
  stacked = jax.tree.map(lambda x: x[None], params)
  metrics = evaluate_stacked(stacked, setup, eval_sets, run=run, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, **kwargs)
  return {k: float(v[0]) for k, v in metrics.items()}
