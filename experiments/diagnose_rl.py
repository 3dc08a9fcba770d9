"""Does GRPO have signal on this base? Per capability, on the VALIDATION split (disjoint from
train and eval; never the eval set):

  greedy_pass1     accuracy of the greedy response
  mean_reward_t1   mean reward of `--samples` responses at temperature 1 (pass@1 at T=1)
  pass_at_k        fraction of prompts with at least one correct response among them
  zero_variance    fraction of prompts whose `--samples` rewards are all equal (no GRPO
                   gradient from that group)

If pass@k is far above pass@1, the right answer is usually among the samples and GRPO has
something to sharpen. With `--rl_steps N` it also trains the experts for N steps and
reports each step's gradient norm, update norm and largest single-weight change.

    python experiments/diagnose_rl.py [--config configs/experts.py] [--examples 512] \
        [--rl_steps 10] [--set rl.learning_rate=3e-4] [--workdir /tmp/diagnose_rl]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from copd_jax.config_lib import spec_of
from copd_jax import (
  policy_setup,  # noqa: E402
  warm_start,  # noqa: E402
)
from copd_jax.data import examples as examples_lib, toy_tasks as tasks, verifiers
from copd_jax.rl import evaluation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tune_rl  # noqa: E402  (config from --set settings)


def validation_set(cfg, setup, capability: str, n: int) -> list[examples_lib.Example]:
  """n examples of the validation split (disjoint from train and eval)."""
  return tasks.validation_set(capability, n, seed=cfg.tasks.seed,
                              difficulty=cfg.tasks.difficulty[capability], **setup.example_kwargs)


def signal_report(params, cfg, setup, examples_per_capability: int, samples: int) -> dict:
  """{capability: {greedy_pass1, mean_reward_t1, pass_at_k, zero_variance}}."""
  from copd_jax.rl import methods
  run = methods.run_sharding(spec_of(cfg), setup.model_cfg)
  report = {}
  for cap in cfg.tasks.capabilities:
    examples = validation_set(cfg, setup, cap, examples_per_capability)
    greedy = evaluation.greedy_responses_stacked(
        jax.tree.map(lambda x: x[None], params), setup, examples, run,
        cfg.sampling.max_new_tokens, cfg.eval.batch_size)[0]
    # Correct samples per example (0/1 rewards): all the sampled statistics follow.
    correct = evaluation.sampled_correct_counts(
        jax.tree.map(lambda x: x[None], params), setup, examples, run=run, num_samples=samples,
        temperature=1.0, max_new_tokens=cfg.sampling.max_new_tokens,
        batch_size=cfg.eval.batch_size, seed=cfg.seed)[0]
    report[cap] = {
        "greedy_pass1": float(verifiers.rewards_for(greedy, examples).mean()),
        "mean_reward_t1": float(correct.mean() / samples),
        f"pass_at_{samples}": float((correct > 0).mean()),
        "zero_variance": float(((correct == 0) | (correct == samples)).mean()),
    }
  return report


def rl_step_report(cfg, setup, base, steps: int) -> dict:
  """Trains cfg's method for `steps` steps; per-step grad / update size per branch."""
  from copd_jax.rl import methods
  from copd_jax.run_log import MetricsWriter
  cfg.rl.steps = steps
  cfg.rl.eval_every = 10 ** 6  # no evaluation inside: only the step statistics matter
  cfg.rl.diagnostics_every = 10 ** 6
  cfg.checkpoint.every_steps = 0
  writer = MetricsWriter(cfg.workdir)
  methods.run_rl_method(spec_of(cfg), setup, base, writer)
  writer.close()
  rows = [json.loads(line) for line in open(os.path.join(cfg.workdir, "metrics.jsonl"))]
  # Logged per branch as train/<branch>/<metric>; averaged over branches here.
  per_step = [r for r in rows if any(k.endswith("/grad_norm") for k in r)]
  out = {}
  for key in ("grad_norm", "update_norm", "update_max_abs", "reward/native"):
    values = [[v for k, v in r.items() if k.startswith("train/") and k.endswith(f"/{key}")]
              for r in per_step]
    out[key] = [round(float(np.mean(v)), 6) for v in values if v]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", default="experts")
  parser.add_argument("--examples", type=int, default=512, help="per capability")
  parser.add_argument("--samples", type=int, default=8)
  parser.add_argument("--rl_steps", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], help="dotted.field=value")
  parser.add_argument("--workdir", default="/tmp/diagnose_rl")
  args = parser.parse_args()
  cfg = tune_rl.config_from_settings(args.method, args.set, args.workdir)
  setup = policy_setup.build_setup(spec_of(cfg))
  base, _ = warm_start.get_base_policy(spec_of(cfg), setup)
  result = {"settings": args.set, "examples_per_capability": args.examples,
            "signal": signal_report(base, cfg, setup, args.examples, args.samples)}
  for cap, r in result["signal"].items():
    print(cap, {k: round(v, 3) for k, v in r.items()}, flush=True)
  if args.rl_steps:
    result["rl_steps"] = rl_step_report(cfg, setup, base, args.rl_steps)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
