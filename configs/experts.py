"""One RLVR (GRPO) expert per capability, trained independently from the shared base.

E = number of capabilities branches, beta = 0; each runs config.rl.steps steps."""
from copd_jax import default_config


def get_config(preset: str = "toy"):
  return default_config.get("experts", preset)
