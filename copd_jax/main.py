"""Main job: `python -m copd_jax.main --config=configs/<name>.py [--config.a.b=value]`.

`--help` lists the chosen config's fields with their defaults and meanings; `--dry_run`
validates, prints the resolved config (run directory included) and exits 0. Without
`--config.workdir` the run goes to runs/<method>[-<overrides>]-<config hash>, so the
same command resumes its own run and a changed config gets a directory of its own.

Every method first warm-starts (or reloads) the shared base policy. `base` then
evaluates it on each capability's held-out set; the RL methods train their branches
(copd_jax/rl/methods.py) and evaluate them. TensorBoard events, metrics.jsonl, summary.json,
the final parameters and the training checkpoints (checkpoints/<stage>/<step>) go under
config.workdir. A killed or preempted run resumes when started again with the same command
(config.checkpoint.resume); SIGTERM saves at the next step boundary and exits 0.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

from absl import app, flags, logging

from copd_jax import (
  cli,  # defines --traceback
  distributed,  # defines --coordinator_address/--num_processes/--process_id
)

_CONFIG = cli.config_flag("Run config (configs/*.py).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate the config, print it resolved "
                             "(run directory included) and exit 0 without running.")


# Logged metrics TensorBoard's HPARAMS tab shows next to the hyperparameters.
SUMMARY_METRICS = ("eval/accuracy/overall", "eval/merged/accuracy/overall")


def make_mirror(spec):
  """A run_log.WandbMirror when config.log.wandb is on, else None."""
  if not spec.log.wandb:
    return None
  from copd_jax.run_log import WandbMirror
  return WandbMirror(spec.workdir, project=spec.log.wandb_project, mode=spec.log.wandb_mode,
                     name=os.path.basename(os.path.abspath(spec.workdir)),
                     config_json=spec.config_json)


def log_base_completions(spec, eval_sets, responses: dict, writer, rewards) -> None:
  """The base's greedy responses to the first config.log.completions held-out examples
  of every capability (copd_jax.rl.loop.eval_completion_records)."""
  count = int(spec.log.completions)
  if not count:
    return
  from copd_jax.rl import loop
  writer.write_completions(spec.warm_start.steps, "eval", loop.eval_completion_records(
      ["base"], eval_sets, responses, count, rewards))


def training_reward_ends(metrics_path: str) -> dict:
  """{'reward_first_step', 'reward_last_step'}: the mean native training reward over the
  branches (train/<branch>/reward/native) at the first and the last step that logged one;
  {} when none did (the base)."""
  by_step: dict[int, list[float]] = {}
  if not os.path.isfile(metrics_path):
    return {}
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      values = [v for k, v in row.items() if k.startswith("train/") and
                k.endswith("/reward/native") and isinstance(v, (int, float))]
      if values and isinstance(row.get("step"), int):
        by_step[row["step"]] = values  # a rewound-and-rewritten step keeps its last line
  if not by_step:
    return {}
  first, last = min(by_step), max(by_step)
  mean = lambda step: round(sum(by_step[step]) / len(by_step[step]), 4)  # noqa: E731
  return {"reward_first_step": mean(first), "reward_last_step": mean(last)}


def keep_finished_train_seconds(spec, summary: dict) -> dict:
  """A rerun of a finished run restores every stage and trains nothing: its summary keeps
  the train_seconds the run took, not the seconds this rerun spent loading it."""
  path = os.path.join(spec.workdir, "summary.json")
  if "train_seconds" not in summary or not spec.checkpoint.resume or \
      not os.path.isfile(path):
    return summary
  try:
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
  except (OSError, json.JSONDecodeError):
    return summary
  if isinstance(previous, dict) and previous.get("steps") == summary.get("steps") and \
      isinstance(previous.get("train_seconds"), (int, float)):
    summary["train_seconds"] = previous["train_seconds"]
  return summary


def run(cfg) -> dict | None:
  """Runs one config end to end and returns the summary it writes.

  RL methods checkpoint their training state under <workdir>/checkpoints and resume from
  it (config.checkpoint). On SIGTERM the run saves at the next step boundary, prints
  `preempted: ...`, writes no summary.json and returns None (the process exits 0);
  the same command resumes it."""
  # Validate and translate before importing jax-heavy modules or compiling anything:
  # nothing below here reads the ConfigDict, only the RunSpec.
  from copd_jax import config_lib, run_dir
  spec = config_lib.build(cfg)
  # A run directory belongs to one method and training config: checked before anything
  # in it is written, rewound or overwritten.
  run_dir.check_workdir(spec)

  import jax

  # One writer per run directory: a second run on this workdir stops here, naming the
  # holder's pid, before any backend starts. In a multi-process run process 0 holds it
  # for all (asking which process this is starts the backend, so only then).
  primary = not jax.distributed.is_initialized() or jax.process_index() == 0
  with run_dir.DirectoryLock(spec.workdir) if primary else contextlib.nullcontext():
    # Checked again under the lock: another run may have written it meanwhile.
    return _run_locked(spec, run_dir.check_workdir(spec))


def _run_locked(spec, stored: dict | None) -> dict | None:
  """main.run once the workdir is checked (stored: its config.json) and locked."""
  import jax

  from copd_jax import policy_setup, run_dir, warm_start
  from copd_jax.rl import evaluation
  from copd_jax.run_log import MetricsWriter

  # In a multi-process run every process computes the same metrics; process 0 writes the
  # run's logs and summary, the others keep theirs under process_<i>/ (for debugging).
  primary = jax.process_index() == 0
  log_dir = spec.workdir if primary else os.path.join(spec.workdir, f"process_{jax.process_index()}")
  os.makedirs(log_dir, exist_ok=True)
  if primary:
    run_dir.write_config(spec, stored)
  setup = policy_setup.build_setup(spec)
  eval_sets = policy_setup.held_out_sets(spec, setup) if spec.method == "base" else None
  writer = MetricsWriter(log_dir, mirror=make_mirror(spec) if primary else None)
  if primary:
    writer.write_config(spec.config_json, metric_tags=SUMMARY_METRICS)
  try:
    start = time.perf_counter()
    params, loaded = warm_start.get_base_policy(spec, setup, writer)
    warm_seconds = time.perf_counter() - start
    source = spec.init.hf_checkpoint or warm_start.base_policy_dir(spec)
    print(("loaded" if loaded else "trained") + f" base policy in {warm_seconds:.1f}s "
          f"({source})", flush=True)
    summary = {"method": spec.method, "seed": spec.seed, "base_policy_loaded": loaded,
               "warm_start_seconds": round(warm_seconds, 2),
               "eval_examples_per_capability": spec.eval.num_examples}
    if spec.method == "base":
      from copd_jax.rl import methods
      from copd_jax.run_log import Phase
      responses, rewards = {}, {}
      run = methods.run_sharding(spec, setup.model_cfg)  # the RL runs' sampler and mesh
      with Phase("evaluation", total=len(eval_sets)) as phase:
        metrics = evaluation.evaluate(params, setup, eval_sets, run=run,
                                      max_new_tokens=spec.sampling.max_new_tokens,
                                      batch_size=spec.eval.batch_size, responses_out=responses,
                                      rewards_out=rewards, progress=phase.advance,
                                      **evaluation.pass_at_k_kwargs(spec))
      if primary:  # per-item rewards, for paired comparisons with the RL methods
        evaluation.save_eval_rewards(os.path.join(spec.workdir, "eval_rewards.npz"),
                                     {"base": {c: r[0] for c, r in rewards.items()}})
      writer.write(spec.warm_start.steps, {f"eval/{k}": v for k, v in metrics.items()})
      log_base_completions(spec, eval_sets, responses, writer, setup.rewards)
      summary.update(metrics)
    else:
      from copd_jax import train_checkpoint
      from copd_jax.rl import methods
      try:
        summary.update(methods.run_rl_method(spec, setup, params, writer))
      except train_checkpoint.Preempted as stop:
        # Preemption is not a failure: the state is saved; rerunning resumes it.
        print(f"preempted: {stop}", flush=True)
        return None
  finally:
    writer.close()
  if primary:
    summary.update(training_reward_ends(os.path.join(spec.workdir, "metrics.jsonl")))
    summary = keep_finished_train_seconds(spec, summary)
    with open(os.path.join(spec.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  print("summary: " + json.dumps(summary), flush=True)
  return summary


def dry_run(cfg) -> str:
  """Validates cfg (fields, run directory ownership, model/tokenizer/record setup: nothing
  compiles) and returns the resolved config as JSON."""
  from copd_jax import config_lib, memory_budget, policy_setup, run_dir
  spec = config_lib.build(cfg)  # sizes included (memory_budget.check)
  stored = run_dir.check_workdir(spec)
  policy_setup.build_setup(spec)
  state = "new run directory" if stored is None else "resumes the run in this directory"
  return (cfg.to_json_best_effort(indent=2) + f"\n# workdir {spec.workdir}: {state}; "
          f"training config hash {run_dir.config_hash(spec)}\n# "
          + memory_budget.describe(cfg))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<method>.py is required (see --help)")
  cfg = cli.config_from_flag("config")
  if _DRY_RUN.value:
    print(dry_run(cfg), flush=True)
    return
  distributed.initialize_from_flags()  # before any other JAX call
  run(cfg)


if __name__ == "__main__":
  cli.run(main, __doc__)
