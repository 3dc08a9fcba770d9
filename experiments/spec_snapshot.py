"""The RunSpec every shipped config file and preset builds, as JSON: a before/after check
that a config change (a recipe spelled out, a default moved) leaves every run the same.

    python experiments/spec_snapshot.py --out=/tmp/before.json     # on the old code
    python experiments/spec_snapshot.py --out=/tmp/after.json --compare=/tmp/before.json

Real configs (a checkpoint and record files) get the committed test fixtures injected as
command-line overrides (tests/fixtures); the pod configs are lowering-only here (spec_of,
unchecked), the others are built and checked (config_lib.build). The last line is JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

# config file -> the config arguments (presets / domain lists) it is built with
CASES = {
    **{m: ("toy", "micro", "demo") for m in ("base", "experts", "mixed_rlvr", "static_opd",
                                            "mopd", "copd")},
    "hf_copd": ("", "micro", "math,science,micro", "science,math"),
    "hf_vl_copd": ("", "micro", "math,chart,clip,micro"),
    "pod_4b": ("",), "pod_4b_v5e": ("",), "pod_4b_v6e": ("",),
}
LOWERING_ONLY = ("pod_4b", "pod_4b_v5e", "pod_4b_v6e")


def _plain(value):
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def snapshot() -> dict:
  from copd_jax import cli, config_lib
  import fixture_configs
  out = {}
  for name, args in CASES.items():
    for arg in args:
      spec = os.path.join(REPO, "configs", f"{name}.py") + (f":{arg}" if arg else "")
      cfg = cli.load_config_file(spec)
      fixture_configs.inject_fixtures(cfg, name)
      built = (config_lib.spec_of if name in LOWERING_ONLY else config_lib.build)(cfg)
      out[f"{name}:{arg}"] = _plain(built)  # config_json included (the run's hash record)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--compare", default="")
  args = parser.parse_args()
  now = snapshot()
  with open(args.out, "w") as f:
    json.dump(now, f, indent=1, sort_keys=True, default=repr)
  result = {"configs": len(now)}
  if args.compare:
    with open(args.compare) as f:
      before = json.load(f)
    now = json.loads(json.dumps(now, sort_keys=True, default=repr))
    result["missing"] = sorted(set(before) - set(now))
    result["differ"] = sorted(k for k in before if k in now and before[k] != now[k])
    result["equal"] = sum(1 for k in before if k in now and before[k] == now[k])
  print(json.dumps(result))


if __name__ == "__main__":
  main()
