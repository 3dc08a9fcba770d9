"""Static OPD (two branches, text + image): after the experts, one frozen expert
(rl.static_opd.teacher) teaches the other (rl.static_opd.student) for rl.distill_steps
steps, one way; the student keeps its own GRPO batch."""
from copd_jax import default_config


def get_config(preset: str = "toy"):
  return default_config.get("static_opd", preset)
