"""CoPD (the paper): branches co-evolve from the base. Cycles of rl.opd.schedule.s_rl
steps of branch-specific GRPO and s_opd steps where each branch also learns from its
teachers' live log-probs on its own rollouts of their prompts (hub-and-spoke, hub = text);
uniform parameter merge at the end.

  python -m copd_jax.main --config=configs/copd.py          # toy (the committed results)
  python -m copd_jax.main --config=configs/copd.py:micro    # tiny; used by tests
  python -m copd_jax.main --config=configs/copd.py:demo     # a first run that learns
The demo starts from the committed toy base (experiments/results/base_policy) and trains a
text and an image branch for 20 steps; summary.json's reward_first_step and
reward_last_step give the mean native training reward at the first and the last step."""
from copd_jax import config_files, default_config

common = config_files.sibling_config(__file__, "common.py")


def get_config(preset: str = "toy"):
  c = common.toy_method("copd")  # the toy base and the GRPO recipe (configs/common.py)
  c.rl.capabilities = ("text", "image", "video")  # one co-evolving branch each
  c.num_experts = 3
  c.rl.cross_prompts = 8  # per branch, on OPD steps, from its teachers' data
  c.rl.opd.update(dict(
      topology="hub",         # every branch <-> the hub (the paper's)
      hub="text",
      beta=1.0,               # OPD rate of every branch (rl.opd.branch_beta: per branch)
      branch_beta={},
      # 3 RL-only steps, then 2 RL + OPD steps: 1.5 : 1, the paper's best.
      schedule=dict(kind="cycle", s_rl=3, s_opd=2, constant_weight=1.0,
                    overlap_target=0.9, warmup_steps=0),
      estimator="sampled_token",  # the paper's sampled-token log-ratio advantage
      top_k=16,
  ))
  c.rl.merge_weights = {}  # the final merge: a uniform average of the branches
  return default_config.apply_preset(c, preset)
