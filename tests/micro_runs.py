"""Micro-config runs shared by the tests that train a few steps: the micro base policy,
an experts config in a test's temporary directory, and one RL method run on it."""
import jax

from copd_jax.config_lib import spec_of
from copd_jax import config_lib, default_config, policy_setup
from copd_jax.models import decoder
from copd_jax.rl import methods
from copd_jax.run_log import MetricsWriter


def micro_base():
  """(RunSetup, base params) of the micro experts config: a random base policy."""
  setup = policy_setup.build_setup(spec_of(default_config.get("experts", "micro")))
  return setup, decoder.init_params(setup.model_cfg, jax.random.key(0))


def experts_config(tmp_path, **rl):
  """The micro experts config in tmp_path/experts, rl fields overridden, with an entropy
  bonus: rewards of a random policy are 0, so that the parameters move all the same."""
  cfg = default_config.get("experts", "micro")
  cfg.workdir = str(tmp_path / "experts")
  cfg.rl.update(rl)
  cfg.rl.loss.entropy_coef = 0.01
  config_lib.validate_config(cfg)
  return cfg


def run_method(cfg, base):
  """methods.run_rl_method of cfg from base = (setup, params); returns its summary."""
  setup, params = base
  writer = MetricsWriter(cfg.workdir)
  try:
    return methods.run_rl_method(spec_of(cfg), setup, params, writer)
  finally:
    writer.close()
