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
from copd_jax import default_config


def get_config(preset: str = "toy"):
  return default_config.get("copd", preset)
