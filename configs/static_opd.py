"""Static OPD (two branches, text + image): after the experts, one frozen expert
(rl.static_opd.teacher) teaches the other (rl.static_opd.student) for rl.distill_steps
steps, one way; the student keeps its own GRPO batch."""
from copd_jax import config_files, default_config

common = config_files.sibling_config(__file__, "common.py")


def get_config(preset: str = "toy"):
  c = common.toy_method("static_opd")  # the toy base and the GRPO recipe (configs/common.py)
  c.rl.capabilities = ("text", "image")  # the paper's two-branch setting
  c.num_experts = 2
  c.rl.static_opd.update(dict(teacher="text", student="image"))
  c.rl.distill_steps = 60  # stage 2, after the experts' rl.steps
  c.rl.cross_prompts = 8  # student prompts per step from the teacher's data
  c.rl.opd.beta = 1.0  # the distillation rate
  return default_config.apply_preset(c, preset)
