"""Export a finished run's policy as a Hugging Face Qwen3 or Qwen3-VL checkpoint directory.

    python -m copd_jax.export --workdir=runs/hf_copd --out=/models/copd-merged
        [--branch=merged|<branch name>] [--dtype=bfloat16|float32]

Same command-line conventions as copd_jax.main (copd_jax/cli.py): --help, one-line
errors, --traceback.

Reads <workdir>/config.json and <workdir>/final_params (written by copd_jax.main), picks
the merged model (the CoPD deliverable: the branch average with config.rl.merge_weights)
or one branch, and writes config.json + safetensors (+ the run's tokenizer files) that
`transformers` and the usual evaluation tools load. A run from a Qwen3-VL checkpoint
exports a Qwen3VLForConditionalGeneration (vision tower included) with the source
checkpoint's config.json, processor and tokenizer files. Of the toy model only the text
decoder exports (a Qwen3ForCausalLM holds no vision tower; see hf_checkpoint.export_qwen3).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags

from copd_jax import checkpoint, cli, policy_setup
from copd_jax.models import hf_checkpoint, qwen3_vl_export, stacked as stacked_lib
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig

MERGED = "merged"


def load_run_policy(workdir: str, branch: str = MERGED):
  """(run config, model config, single-policy params) of a finished run.

  branch: 'merged' (the weighted branch average; the only policy of a one-branch run) or a
  branch name stored in final_params/metadata.json. Errors name the missing file/branch."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a copd_jax.main workdir?")
  with open(config_path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  directory = os.path.join(workdir, "final_params")
  metadata = checkpoint.read_metadata(directory)
  names = list(metadata.get("branches", []))
  if branch != MERGED and branch not in names:
    raise ValueError(f"--branch={branch!r} is not a branch of this run; branches: {names} "
                     f"(or '{MERGED}')")
  setup = policy_setup.build_setup(cfg)
  abstract = jax.eval_shape(
      lambda k: stacked_lib.broadcast_params(policy_setup.init_policy_params(setup.model_cfg, k),
                                             len(names)),
      jax.random.key(0))
  stacked = checkpoint.load_policy(  # the run's own setting for unverified checkpoints
      directory, abstract, allow_unverified=bool(cfg.get("checkpoint", {}).get(
          "allow_unverified", False)))
  if branch == MERGED:
    weights = None
    if cfg.rl.get("merge_weights"):
      weights = [cfg.rl.merge_weights.get(name, 0.0) for name in names]
    params = stacked_lib.merge(stacked, weights)
  else:
    params = stacked_lib.take_expert(stacked, names.index(branch))
  return cfg, setup.model_cfg, params


def export_run(workdir: str, out_dir: str, *, branch: str = MERGED, dtype: str = "bfloat16") -> None:
  cfg, model_cfg, params = load_run_policy(workdir, branch)
  params = jax.tree.map(np.asarray, params)
  if isinstance(model_cfg, Qwen3VLConfig):  # config.json and processor files: the source's
    qwen3_vl_export.export_qwen3_vl(out_dir, params, model_cfg,
                                    source_dir=cfg.init.hf_checkpoint, dtype=dtype)
    return
  tokenizer_dir = None
  if cfg.get("init") and cfg.init.get("hf_checkpoint"):
    tokenizer_dir = policy_setup.hf_tokenizer_dir(cfg)
  hf_checkpoint.export_qwen3(out_dir, params, model_cfg,
                             tokenizer_dir=tokenizer_dir, dtype=dtype)


_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the HF checkpoint to.")
_BRANCH = flags.DEFINE_string("branch", MERGED, "'merged' or a branch name.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored dtype.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name, flag in (("workdir", _WORKDIR), ("out", _OUT)):
    if not flag.value:
      raise app.UsageError(f"--{name} is required (see --help)")
  export_run(_WORKDIR.value, _OUT.value, branch=_BRANCH.value, dtype=_DTYPE.value)
  print(f"exported {_BRANCH.value} policy of {_WORKDIR.value} to {_OUT.value}", flush=True)


if __name__ == "__main__":
  cli.run(main, __doc__)
