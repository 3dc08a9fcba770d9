"""The committed test fixtures injected into the real configs (configs/hf_copd.py,
configs/hf_vl_copd.py), which require their checkpoint and record paths: what the tests
(and experiments/spec_snapshot.py) set on a config, or pass on a command line."""
import os

import paths

QWEN3_TINY = os.path.join(paths.HF_FIXTURES, "qwen3_tiny", "untied_f32")
QWEN3_TINY_TOKENIZER = os.path.join(paths.HF_FIXTURES, "qwen3_tiny", "tokenizer")
QWEN3_VL_RUN = os.path.join(paths.HF_FIXTURES, "qwen3_vl_run")
_VL = os.path.join(paths.DATA_FIXTURES, "vl")

# config file -> (checkpoint, tokenizer, {domain: (train file, eval file)})
FIXTURES = {
    "hf_copd": (QWEN3_TINY, QWEN3_TINY_TOKENIZER, {
        "math": (os.path.join(paths.DATA_FIXTURES, "math_train.jsonl"),
                 os.path.join(paths.DATA_FIXTURES, "math_eval.jsonl")),
        "science": (os.path.join(paths.DATA_FIXTURES, "science_train.parquet"),
                    os.path.join(paths.DATA_FIXTURES, "science_eval.parquet"))}),
    # A few records per domain: train and held-out files are the same there.
    "hf_vl_copd": (QWEN3_VL_RUN, "", {
        d: (os.path.join(_VL, f"{kind}.jsonl"),) * 2
        for d, kind in (("math", "text"), ("chart", "image"), ("clip", "video"))}),
}


def fixture_overrides(config_name: str, domains) -> dict:
  """{dotted field: value} pointing config_name's checkpoint, tokenizer and the record
  files of `domains` at the committed fixtures ({} for a config without fixtures)."""
  if config_name not in FIXTURES:
    return {}
  checkpoint, tokenizer, files = FIXTURES[config_name]
  out = {"init.hf_checkpoint": checkpoint, "init.hf_tokenizer": tokenizer}
  for d in domains:
    if d in files:
      out[f"data.train_files.{d}"], out[f"data.eval_files.{d}"] = files[d]
  return out


def inject_fixtures(cfg, config_name: str):
  """cfg with fixture_overrides set (in place; returned for chaining)."""
  from copd_jax import default_config
  domains = tuple(cfg.tasks.capabilities)
  for field, value in fixture_overrides(config_name, domains).items():
    default_config.set_field(cfg, field, value)
  return cfg


def fixture_flags(config_name: str, domains) -> list[str]:
  """fixture_overrides as --config.<field>=value command-line flags."""
  return [f"--config.{k}={v}" for k, v in fixture_overrides(config_name, domains).items()]


def load(config_name: str, arg: str | None = None):
  """configs/<config_name>.py's config (get_config(arg); no argument when arg is None)
  with its fixtures injected."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      config_name, os.path.join(paths.REPO, "configs", f"{config_name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return inject_fixtures(module.get_config() if arg is None else module.get_config(arg),
                         config_name)
