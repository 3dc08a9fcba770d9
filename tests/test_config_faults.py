"""Non-finite and out-of-range config values fail naming the field (issue 13.10).

Each case reproduces a failure found by trying the project with bad input and injected faults,
and checks the behaviour that replaced it. Expected values are written out by hand."""
import pytest

from copd_jax import config_lib, default_config


# ----------------------------------------------------------- 13.10 inf in the config

@pytest.mark.parametrize("field", ["rl.learning_rate", "rl.opd.beta", "rl.grad_clip_norm",
                                   "sampling.temperature", "rl.opd.schedule.overlap_target"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_config_value_is_rejected_naming_the_field(field, value):
  cfg = default_config.get("copd", "micro")
  default_config.set_field(cfg, field, value)
  with pytest.raises(ValueError, match=rf"config\.{field.replace('.', '[.]')} must be a finite"):
    config_lib.validate_config(cfg)


def test_one_sample_per_prompt_and_empty_workdir_are_rejected():
  cfg = default_config.get("copd", "micro")
  cfg.rl.samples_per_prompt = 1
  with pytest.raises(ValueError, match=r"config\.rl\.samples_per_prompt"):
    config_lib.validate_config(cfg)
  cfg = default_config.get("copd", "micro")
  cfg.workdir = ""
  with pytest.raises(ValueError, match=r"config\.workdir"):
    config_lib.validate_config(cfg)


@pytest.mark.parametrize("field, value", [("rl.lr_schedule", "linear"),
                                          ("rl.lr_end_fraction", 1.5),
                                          ("model.attention_kernel", "flash")])
def test_bad_schedule_or_attention_kernel_is_rejected_naming_the_field(field, value):
  cfg = default_config.get("copd", "micro")
  default_config.set_field(cfg, field, value)
  with pytest.raises(ValueError, match=rf"{field.replace('.', '[.]')}"):
    config_lib.validate_config(cfg)
