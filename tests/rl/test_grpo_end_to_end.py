"""End to end (copd_jax.main) where GRPO has a signal: a reward with spread inside every
group (the digit fraction of a response), so the micro CoPD run learns, and the test can
check what a run with all-zero rewards cannot:
  - the native training reward rises (a flipped advantage sign makes it fall);
  - distillation happens on the OPD steps of the 1:1 cycle and only there;
  - the merged model that is evaluated and exported is the average of the final branches,
    which differ (not branch 0, not an average that includes the base).
"""
import json
import os

import jax
import numpy as np
import pytest

from copd_jax import default_config, export, main
from copd_jax.rl import evaluation

STEPS = 10
BRANCHES = ("text", "image", "video")


def learning_config(workdir):
  cfg = default_config.get("copd", "micro")
  cfg.workdir = str(workdir / "copd")
  cfg.warm_start.checkpoint_dir = str(workdir / "base_policy")
  cfg.reward.update(dict(fn="reward_plugins:digit_fraction", workers=1))
  # The micro preset's shapes (2 prompts x 2 samples per branch; programs other tests
  # compile too) with a learning rate that moves the micro model in a few steps;
  # evaluation only at the start and the end (the end evaluates the merged model).
  cfg.rl.update(dict(steps=STEPS, learning_rate=3e-2, lr_schedule="constant",
                     eval_every=1000, diagnostics_every=1000))
  cfg.log.completions = 0
  return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """(workdir, summary, per-step metrics, the single-model params evaluated as 'merged')."""
  workdir = tmp_path_factory.mktemp("grpo")
  cfg = learning_config(workdir)
  merged_evaluated = []
  real_evaluate = evaluation.evaluate_stacked

  def recording(stacked, *args, **kwargs):
    if kwargs.get("progress") is not None and jax.tree.leaves(stacked)[0].shape[0] == 1:
      merged_evaluated.append(jax.tree.map(lambda x: np.asarray(x[0]), stacked))
    return real_evaluate(stacked, *args, **kwargs)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluation, "evaluate_stacked", recording)
    summary = main.run(cfg)
  steps = {}
  for line in open(os.path.join(cfg.workdir, "metrics.jsonl")):
    record = json.loads(line)
    if "train/opd_weight" in record:
      steps[record["step"]] = record
  return cfg.workdir, summary, steps, merged_evaluated


def test_grpo_sees_rewards_and_the_reward_rises(finished_run):
  _, summary, steps, _ = finished_run
  assert sorted(steps) == list(range(1, STEPS + 1))
  native = np.array([[steps[t][f"train/{b}/reward/native"] for b in BRANCHES]
                     for t in sorted(steps)])  # [steps, branches]
  zero_var = np.array([[steps[t][f"train/{b}/zero_variance_groups"] for b in BRANCHES]
                       for t in sorted(steps)])
  assert native.min() > 0 and zero_var.max() < 1.0  # every step had a GRPO signal
  first, last = native[:2].mean(), native[-2:].mean()  # means over branches and 2 steps
  assert last > first + 0.1, native
  assert summary["reward_last_step"] > summary["reward_first_step"]


def test_distillation_follows_the_cycle(finished_run):
  """s_rl = s_opd = 1 (the micro preset): steps 1, 3, 5, ... are RL only, 2, 4, ... add
  OPD, and only those score cross rows with a teacher."""
  _, _, steps, _ = finished_run
  for t in sorted(steps):
    opd = (t - 1) % 2 == 1
    assert steps[t]["train/opd_weight"] == (1.0 if opd else 0.0), t
    for b in BRANCHES:
      tokens = steps[t].get(f"train/{b}/opd/tokens")
      assert (tokens is not None and tokens > 0) if opd else tokens is None, (t, b, tokens)


def test_merged_model_is_the_average_of_the_final_branches(finished_run):
  workdir, _, _, merged_evaluated = finished_run
  branches = [export.load_run_policy(workdir, b)[2] for b in BRANCHES]
  leaves = [np.stack([np.asarray(x) for x in pair]) for pair in
            zip(*(jax.tree.leaves(b) for b in branches))]
  # The branches learned apart: a merge that took one of them would be told apart.
  assert min(max(np.abs(x[k] - x[0]).max() for x in leaves) for k in (1, 2)) > 1e-2
  want = [x.mean(axis=0) for x in leaves]
  # Evaluated: at the last training step and in the final report (held-out accuracy).
  assert len(merged_evaluated) >= 2
  for got in [merged_evaluated[-2], merged_evaluated[-1],
              export.load_run_policy(workdir, "merged")[2]]:
    for a, b in zip(jax.tree.leaves(got), want):
      np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
