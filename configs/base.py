"""Base policy: SFT warm-start on the toy suite, then per-capability evaluation.

Every other method starts from the policy this config produces (saved to
config.warm_start.checkpoint_dir and reused while its recipe matches).
  python -m copd_jax.main --config=configs/base.py          # toy (the committed results)
  python -m copd_jax.main --config=configs/base.py:micro    # seconds; used by tests
"""
from copd_jax import config_files, default_config

common = config_files.sibling_config(__file__, "common.py")


def get_config(preset: str = "toy"):
  # The recipe is configs/common.py's toy base (tasks, warm_start). The config also
  # carries the RL section the methods share (unused by the base), as its runs always have.
  c = common.toy_method("base")
  return default_config.apply_preset(c, preset)
