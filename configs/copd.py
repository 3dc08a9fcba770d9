"""CoPD (the paper): branches co-evolve from the base. Cycles of rl.opd.schedule.s_rl
steps of branch-specific GRPO and s_opd steps where each branch also learns from its
teachers' live log-probs on its own rollouts of their prompts (hub-and-spoke, hub = text);
uniform parameter merge at the end."""
from copd_jax import default_config


def get_config(preset: str = "toy"):
  return default_config.get("copd", preset)
