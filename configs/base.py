"""Base policy: SFT warm-start on the toy suite, then per-capability evaluation.

Every other method starts from the policy this config produces (saved to
config.warm_start.checkpoint_dir and reused while its recipe matches).
  python -m copd_jax.main --config=configs/base.py          # toy (the committed results)
  python -m copd_jax.main --config=configs/base.py:micro    # seconds; used by tests
"""
from copd_jax import default_config


def get_config(preset: str = "toy"):
  return default_config.get("base", preset)
