"""Pick RL hyper-parameters on the VALIDATION split (tasks.validation_set: disjoint from
train and eval), never on the held-out eval set the results report.

    python experiments/tune_rl.py --method experts --set rl.learning_rate=3e-5 --set rl.native_prompts=16

Prints the validation accuracy per branch before and after training (last line JSON).
"""
from __future__ import annotations

import argparse
import ast
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from copd_jax.config_lib import spec_of
from copd_jax import default_config, policy_setup, warm_start  # noqa: E402
from copd_jax.data import toy_tasks as tasks
from copd_jax.rl import methods
from copd_jax.run_log import MetricsWriter  # noqa: E402


def validation_sets(cfg, setup):
  """The validation split (tasks.validation_set): disjoint from train and eval."""
  return {cap: tasks.validation_set(cap, cfg.eval.num_examples, seed=cfg.tasks.seed,
                                    difficulty=cfg.tasks.difficulty[cap], **setup.example_kwargs)
          for cap in cfg.rl.capabilities}


def config_from_settings(method: str, settings, workdir: str):
  """The toy config of `method` with 'dotted.field=value' settings (values parsed as
  Python literals where they are one) and the given workdir."""
  cfg = default_config.get(method, "toy")
  cfg.workdir = workdir
  for item in settings:
    field, value = item.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    default_config.set_field(cfg, field, value)
  return cfg


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--method", default="experts")
  parser.add_argument("--set", action="append", default=[], help="dotted.field=value")
  parser.add_argument("--workdir", default="/tmp/tune_rl")
  args = parser.parse_args()
  cfg = config_from_settings(args.method, args.set, args.workdir)
  setup = policy_setup.build_setup(spec_of(cfg))
  base, _ = warm_start.get_base_policy(spec_of(cfg), setup)
  policy_setup.held_out_sets = validation_sets  # the run evaluates on validation only
  methods.policy_setup.held_out_sets = validation_sets
  writer = MetricsWriter(cfg.workdir)
  summary = methods.run_rl_method(spec_of(cfg), setup, base, writer)
  writer.close()
  before = [json.loads(l) for l in open(os.path.join(cfg.workdir, "metrics.jsonl"))]
  first = next(r for r in before if any(k.endswith("accuracy/overall") for k in r))
  print(json.dumps({"settings": args.set, "method": args.method,
                    "validation_before": {k: round(v, 3) for k, v in first.items() if "accuracy/" in k},
                    "validation_after": summary["branches"]}))


if __name__ == "__main__":
  main()
