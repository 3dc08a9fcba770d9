"""MOPD: after the experts, a student from the base distils from all of them for
rl.distill_steps steps, each prompt routed to its domain's (frozen) teacher, with the
sampled-token log-ratio advantage (plus the outcome reward if rl.mopd.cross_outcome_reward)."""
from copd_jax import default_config


def get_config(preset: str = "toy"):
  return default_config.get("mopd", preset)
