"""Main job: `python -m copd_jax.main --config=configs/<name>.py [--config.a.b=value]`.

Every method first warm-starts (or reloads) the shared base policy. `base` then
evaluates it on each capability's held-out set; the RL methods train their branches
(copd_jax/methods.py) and evaluate them. TensorBoard events, metrics.jsonl, summary.json,
the final parameters and the training checkpoints (checkpoints/<stage>/<step>) go under
config.workdir. A killed or preempted run resumes when started again with the same command
(config.checkpoint.resume); SIGTERM saves at the next step boundary and exits 0.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from copd_jax import distributed  # defines --coordinator_address/--num_processes/--process_id

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py).",
                                          lock_config=True)


def run(cfg) -> dict | None:
  """Runs one config end to end and returns the summary it writes.

  RL methods checkpoint their training state under <workdir>/checkpoints and resume from
  it (config.checkpoint). On SIGTERM the run saves at the next step boundary, prints
  `preempted: ...`, writes no summary.json and returns None (the process exits 0);
  the same command resumes it."""
  # Validate before importing jax-heavy modules or compiling anything.
  from copd_jax import config_lib
  config_lib.validate_config(cfg)

  import jax
  from copd_jax import evaluation, policy_setup, verifiers, warm_start
  verifiers.configure(verifiers.RewardConfig(**cfg.reward.to_dict()))
  from copd_jax.run_log import MetricsWriter

  # In a multi-process run every process computes the same metrics; process 0 writes the
  # run's logs and summary, the others keep theirs under process_<i>/ (for debugging).
  primary = jax.process_index() == 0
  log_dir = cfg.workdir if primary else os.path.join(cfg.workdir, f"process_{jax.process_index()}")
  os.makedirs(log_dir, exist_ok=True)
  if primary:
    with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
  setup = policy_setup.build_setup(cfg)
  eval_sets = policy_setup.held_out_sets(cfg, setup) if cfg.method == "base" else None
  writer = MetricsWriter(log_dir)
  try:
    start = time.perf_counter()
    params, loaded = warm_start.get_base_policy(cfg, setup, writer)
    warm_seconds = time.perf_counter() - start
    source = cfg.init.hf_checkpoint or warm_start.base_policy_dir(cfg)
    print(("loaded" if loaded else "trained") + f" base policy in {warm_seconds:.1f}s "
          f"({source})", flush=True)
    summary = {"method": cfg.method, "seed": cfg.seed, "base_policy_loaded": loaded,
               "warm_start_seconds": round(warm_seconds, 2),
               "eval_examples_per_capability": cfg.eval.num_examples}
    if cfg.method == "base":
      metrics = evaluation.evaluate(params, setup, eval_sets,
                                    max_new_tokens=cfg.sampling.max_new_tokens,
                                    batch_size=cfg.eval.batch_size)
      writer.write(cfg.warm_start.steps, {f"eval/{k}": v for k, v in metrics.items()})
      summary.update(metrics)
    else:
      from copd_jax import methods, train_checkpoint
      try:
        summary.update(methods.run_rl_method(cfg, setup, params, writer))
      except train_checkpoint.Preempted as stop:
        # Preemption is not a failure: the state is saved; rerunning resumes it.
        print(f"preempted: {stop}", flush=True)
        return None
  finally:
    writer.close()
  if primary:
    with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  print("summary: " + json.dumps(summary), flush=True)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  distributed.initialize_from_flags()  # before any other JAX call
  run(_CONFIG.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
