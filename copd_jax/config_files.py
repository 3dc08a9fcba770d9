"""Config files are loaded by path, not imported as a package (configs/*.py): a config
built on another one loads it with `sibling_config`, as configs/copd.py loads
configs/common.py and configs/pod_4b_v5e.py loads configs/pod_4b.py."""
from __future__ import annotations

import importlib.util
import os


def config_module(path: str):
  """The module of the config file at `path` (FileNotFoundError naming it if absent)."""
  spec = importlib.util.spec_from_file_location(
      "_copd_config_" + os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"no config file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling_config(config_file: str, name: str):
  """The module of config file `name` in the directory of `config_file` (a config's own
  __file__)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  try:
    return config_module(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"config {config_file}: no config file {path}") from None
