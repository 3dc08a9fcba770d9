"""Invalid config values fail at once, with a message naming the field."""
import importlib.util
import os

import pytest

import fixture_configs
import paths
from copd_jax import config_lib, default_config, run_spec

REPO = paths.REPO


def load_config(name="base", preset="micro"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if preset is None else module.get_config(preset)


def test_every_shipped_config_validates_and_names_its_method():
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                 if f.endswith(".py") and f != "common.py")  # common.py: the shared recipe
  assert set(default_config.METHODS) <= set(names)  # one config per method, named after it
  for name in default_config.METHODS:
    for preset in ("toy", "micro"):
      cfg = load_config(name, preset)
      assert cfg.method == name
      config_lib.validate_config(cfg)  # raises on any invalid field
  for name in sorted(set(names) - set(default_config.METHODS)):  # e.g. hf_copd, pod_4b
    cfg = fixture_configs.load(name)  # a real config's paths: the committed fixtures ...
    assert cfg.method in default_config.METHODS
    if name.startswith("pod_4b"):  # ... or, without fixtures (a 4B pod), the rest checked
      cfg = config_lib.without_unset_paths(cfg)
    config_lib.validate_config(cfg)


@pytest.mark.parametrize("field, value, message", [
    ("method", "grpo_plus", r"config\.method must be one of"),
    ("num_experts", 3, r"config\.num_experts must be 1 for method 'base'"),
    ("num_experts", 0, r"config\.num_experts must be a positive integer"),
    ("tasks.capabilities", ("text", "audio"), r"config\.tasks\.capabilities has unknown task 'audio'"),
    ("tasks.capabilities", ("text", "text"), r"config\.tasks\.capabilities must not repeat"),
    ("tasks.capabilities", (), r"config\.tasks\.capabilities must name at least one"),
    ("data.max_prompt_len", 0, r"config\.data\.max_prompt_len must be a positive integer"),
    ("data.max_response_len", -4, r"config\.data\.max_response_len must be a positive integer"),
    ("data.max_response_len", 10, r"config\.data\.max_response_len must be >= "),
    ("tasks.difficulty", dict(text=3, image=1, video=1), r"config\.data\.max_response_len must be >= 30"),
    ("warm_start.batch_size", 0, r"config\.warm_start\.batch_size must be a positive integer"),
    ("warm_start.learning_rate", -1.0, r"config\.warm_start\.learning_rate must be positive"),
    ("eval.num_examples", 0, r"config\.eval\.num_examples must be a positive integer"),
    ("model.num_kv_heads", 3, r"config\.model\.num_heads must be a multiple of num_kv_heads"),
    ("model.dtype", "float16", r"config\.model\.dtype must be one of"),
    ("model.head_dim", 15, r"config\.model\.head_dim must be even"),
    ("model.vision.num_frames", 3, r"config\.model\.vision\.num_frames must be a multiple"),
    ("model.vision.image_size", 30, r"config\.model\.vision\.image_size must be a multiple"),
    ("sampling.top_p", 1.5, r"config\.sampling\.top_p must be in"),
    ("sampling.temperature", 0.0, r"config\.sampling\.temperature must be positive"),
    ("sampling.max_new_tokens", 1000, r"config\.sampling\.max_new_tokens must not exceed"),
])
def test_invalid_values_name_the_field(field, value, message):
  cfg = load_config()
  default_config.set_field(cfg, field, value)
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(cfg)


def test_difficulty_and_mix_must_match_capabilities():
  cfg = load_config()
  cfg.tasks.difficulty = dict(text=1, image=1, audio=1)
  with pytest.raises(ValueError, match=r"config\.tasks\.difficulty names capabilities not in"):
    config_lib.validate_config(cfg)
  cfg = load_config()
  cfg.warm_start.mix = dict(text=0.0, image=0.0, video=0.0)
  with pytest.raises(ValueError, match=r"config\.warm_start\.mix must give some capability"):
    config_lib.validate_config(cfg)
  cfg = load_config()
  cfg.tasks.difficulty = dict(text=1, image=1)
  with pytest.raises(ValueError, match=r"config\.tasks\.difficulty needs an entry for 'video'"):
    config_lib.validate_config(cfg)


@pytest.mark.parametrize("field, value, message", [
    ("method", "grpo", r"config\.method must be one of"),
    ("num_experts", 2, r"config\.num_experts must equal the number of rl\.capabilities \(3\)"),
    ("sampling.temperature", 0.7, r"config\.sampling\.temperature must be 1\.0 for RL methods"),
    ("rl.opd.hub", "audio", r"config\.rl\.opd\.hub must be one of rl\.capabilities"),
    ("rl.merge_weights", {"text": -1.0}, r"config\.rl\.merge_weights\.text must be non-negative"),
    ("warm_start.flaw_rate", {"text": 1.5}, r"config\.warm_start\.flaw_rate\.text must be a fraction"),
    ("tasks.capabilities", ("text", "text"), r"config\.tasks\.capabilities must not repeat"),
])
def test_a_run_spec_checks_itself_without_config_lib(field, value, message):
  """The checks live in the dataclasses (__post_init__): a RunSpec changed after build
  (run_spec.replace_fields, as tpu_compile.small_config does) is checked again."""
  spec = config_lib.build(load_config("copd"))
  with pytest.raises(ValueError, match=message):
    run_spec.replace_fields(spec, {field: value})
