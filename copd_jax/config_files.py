"""Config files that build on other config files (configs/*.py are loaded by path, not
imported as a package)."""
from __future__ import annotations

import os


def sibling_config(config_file: str, name: str):
  """The module of config file `name` in the directory of `config_file` (a config's own
  __file__). Config files are loaded by path, not imported as a package, so a config
  built on another one loads it this way (e.g. configs/pod_4b_v5e.py on pod_4b.py)."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(
      "_copd_config_" + os.path.splitext(os.path.basename(name))[0], path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config {config_file}: no config file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
