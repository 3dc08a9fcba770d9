"""MOPD: after the experts, a student from the base distils from all of them for
rl.distill_steps steps, each prompt routed to its domain's (frozen) teacher, with the
sampled-token log-ratio advantage (plus the outcome reward if rl.mopd.cross_outcome_reward)."""
from copd_jax import config_files, default_config

common = config_files.sibling_config(__file__, "common.py")


def get_config(preset: str = "toy"):
  c = common.toy_method("mopd")  # the toy base and the GRPO recipe (configs/common.py)
  c.rl.capabilities = ("text", "image", "video")  # one expert (teacher) each
  c.num_experts = 3
  c.rl.distill_steps = 60  # stage 2, after the experts' rl.steps
  c.rl.opd.update(dict(beta=1.0, estimator="sampled_token"))  # the distillation signal
  c.rl.mopd.cross_outcome_reward = False  # distillation rows: the teachers' signal only
  return default_config.apply_preset(c, preset)
