"""Mixed RLVR: one branch, prompts drawn from all capabilities, for the sum of the
experts' steps (config.rl.steps x number of capabilities)."""
from copd_jax import config_files, default_config

common = config_files.sibling_config(__file__, "common.py")


def get_config(preset: str = "toy"):
  c = common.toy_method("mixed_rlvr")  # the toy base and the GRPO recipe (configs/common.py)
  c.rl.capabilities = ("text", "image", "video")  # prompts of every capability, mixed
  c.num_experts = 1  # one policy
  return default_config.apply_preset(c, preset)
