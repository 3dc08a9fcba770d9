"""Reward dispatch: each example names its verifier; rewards for a batch of responses."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from copd_jax.data.answers import (
  MAX_ANSWER_DIGITS,
  VERIFIERS,
  canonical_choice,
  canonical_integer,
  choice_reward,
  exact_reward,
  reward,
)
from copd_jax.data.math_verifier import (
  PoolStats,
  RewardConfig,
  RewardExample,
  check_math_reference,
  math_equivalent,
  math_request,
  shared_pool,
)
from copd_jax.data.reward_values import (  # noqa: F401  (re-exported for plug-in callers)
  RewardFailure,
  RewardFunctionError,
  check_reward_value,
  report_failures,
)


def check_reference(verifier: str, answer: str) -> None:
  """Raises ValueError if `answer` cannot be a reference answer for `verifier` (form
  checks only; a dataset load also parses math references, check_math_references)."""
  if verifier not in VERIFIERS:
    raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
  if verifier == "integer" and canonical_integer(answer) is None:
    raise ValueError(f"an 'integer' answer must be an integer string of at most "
                     f"{MAX_ANSWER_DIGITS} digits, got {answer!r}")
  if verifier == "choice" and canonical_choice(answer) is None:
    raise ValueError(f"a 'choice' answer must be one letter A-J, got {answer!r}")
  if verifier == "math":
    check_math_reference(answer)
  if verifier == "exact" and (not isinstance(answer, str) or not answer.strip()):
    raise ValueError(f"an 'exact' answer must be a non-empty string, got {answer!r}")


def reward_for(response, answer: str, verifier: str, math_timeout_s: float | None = None) -> float:
  """One response's 0/1 reward under the named verifier (see VERIFIERS)."""
  if verifier == "integer":
    return reward(response, answer)
  if verifier == "math":
    return math_equivalent(response, answer, math_timeout_s)
  if verifier == "choice":
    return choice_reward(response, answer)
  if verifier == "exact":
    return exact_reward(response, answer)
  raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")


def score(responses: Sequence[str], examples: Sequence,
          config: RewardConfig | None = None) -> tuple[np.ndarray, PoolStats]:
  """responses[i] scored against examples[i] (tasks.Example: .answer, .verifier) ->
  (float32[N] rewards, what the worker pool did).

  Built-in verifiers: integer / choice / exact run here (bounded, no parser); math
  requests go to the worker pool, identical (reference, answer) pairs once. With
  config.fn, the plug-in scores every example in the pool. One batch shares
  config.step_budget_s. A plug-in that fails on a response (raises, or returns a value
  check_reward_value rejects) scores it 0 and is counted in stats.errors; the first
  traceback is printed once, and RewardFunctionError is raised when the failures reach
  config.max_error_fraction of the responses (report_failures). config: the run's reward
  settings (run setup's Rewards.config; default RewardConfig())."""
  config = config or RewardConfig()
  if len(responses) != len(examples):
    raise ValueError(f"responses and examples must have the same length, got "
                     f"{len(responses)} responses and {len(examples)} examples")
  out = np.zeros(len(responses), np.float32)
  requests: dict[tuple, list[int]] = {}
  for i, (response, ex) in enumerate(zip(responses, examples)):
    verifier = getattr(ex, "verifier", "integer")
    if config.fn:
      text = response if isinstance(response, str) else ""
      requests.setdefault(("plugin", config.fn, text, RewardExample.of(ex)), []).append(i)
    elif verifier == "math":
      request = math_request(response, ex.answer)
      if request is not None:
        requests.setdefault(request, []).append(i)
    else:
      out[i] = reward_for(response, ex.answer, verifier)
  stats = PoolStats()
  if requests:
    keys = list(requests)
    results, stats = shared_pool(config).run(keys, config.timeout_s, config.step_budget_s)
    failures = []
    for key, value in zip(keys, results):
      if isinstance(value, RewardFailure):  # each response it stands for failed
        failures += [value] * len(requests[key])
        value = 0.0
      out[requests[key]] = value
    stats.errors = len(failures)
    report_failures(failures, len(responses), config.max_error_fraction)
  return out, stats


def rewards_for(responses: Sequence[str], examples: Sequence,
                config: RewardConfig | None = None) -> np.ndarray:
  """float32[N] rewards of responses[i] against examples[i] (see score)."""
  return score(responses, examples, config)[0]
