"""One RLVR (GRPO) expert per capability, trained independently from the shared base.

E = number of capabilities branches, beta = 0; each runs config.rl.steps steps."""
from copd_jax import config_files, default_config

common = config_files.sibling_config(__file__, "common.py")


def get_config(preset: str = "toy"):
  c = common.toy_method("experts")  # the toy base and the GRPO recipe (configs/common.py)
  c.rl.capabilities = ("text", "image", "video")  # one expert each
  c.num_experts = 3
  # No distillation: the experts stage runs with beta = 0 whatever rl.opd says.
  return default_config.apply_preset(c, preset)
