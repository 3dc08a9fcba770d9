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


def share_one_device_programs(monkeypatch) -> None:
  """Single-device runs of one model config in this test process get one RunSharding
  (tiny_model.one_device_run), so a run reuses the sampler, update and evaluation programs
  an earlier run of the same shapes traced and compiled. rl.methods.run_sharding builds a
  new one per run (compared by identity, it is part of every program's static arguments),
  which retraces and relowers each program in every run of a test module. Multi-device
  meshes keep methods.run_sharding's own."""
  from copd_jax.rl import methods
  from tiny_model import one_device_run
  real = methods.run_sharding

  def shared(cfg, model_cfg):
    one = real(cfg, model_cfg)  # (its checks of the mesh config)
    return one_device_run(model_cfg) if one.size == 1 else one
  monkeypatch.setattr(methods, "run_sharding", shared)
