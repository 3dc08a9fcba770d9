"""Mixed RLVR: one branch, prompts drawn from all capabilities, for the sum of the
experts' steps (config.rl.steps x number of capabilities)."""
from copd_jax import default_config


def get_config(preset: str = "toy"):
  return default_config.get("mixed_rlvr", preset)
