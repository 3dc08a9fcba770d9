"""Export a finished run's policy as a Hugging Face Qwen3 or Qwen3-VL checkpoint directory.

    python -m copd_jax.main --config=configs/hf_copd.py --config.workdir=runs/qwen3_copd \
        --config.init.hf_checkpoint=/models/qwen3 --config.data.train_files.math=... (etc.)
    python -m copd_jax.export --workdir=runs/qwen3_copd --out=/models/qwen3-copd-merged
        [--branch=merged|<branch name>] [--dtype=bfloat16|float32] [--overwrite]

--config with the training command's overrides finds the run directory as copd_jax.main
named it (runs/<name>-<hash>); --workdir=runs/<name>-<hash> names it directly. An existing
--out is refused unless --overwrite. Files are written 0644.

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

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
from absl import app, flags

from copd_jax import checkpoint, cli, policy_setup, run_spec
from copd_jax.models import stacked as stacked_lib
from copd_jax.models.policy import policy_of

MERGED = "merged"


def load_run_policy(workdir: str, branch: str = MERGED):
  """(run settings (a RunSpec), model config, single-policy params) of a finished run.

  branch: 'merged' (the weighted branch average; the only policy of a one-branch run) or a
  branch name stored in final_params/metadata.json. Errors name the missing file/branch."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a copd_jax.main workdir?")
  with open(config_path) as f:
    stored = json.load(f)
  cfg = dataclasses.replace(run_spec.from_dict(run_spec.RunSpec, stored), config_json=stored)
  directory = os.path.join(workdir, "final_params")
  metadata = checkpoint.read_metadata(directory)
  names = list(metadata.get("branches", []))
  if branch != MERGED and branch not in names:
    raise ValueError(f"--branch={branch!r} is not a branch of this run; branches: {names} "
                     f"(or '{MERGED}')")
  setup = policy_setup.build_setup(cfg)
  # The run's branches: full copies, or (config.model.lora) one base and the adapters.
  abstract = jax.eval_shape(
      lambda k: stacked_lib.initial_branches(
          policy_setup.init_policy_params(setup.model_cfg, k), len(names),
          cfg.lora, k),
      jax.random.key(0))
  stacked = checkpoint.load_policy(  # the run's own setting for unverified checkpoints
      directory, abstract, allow_unverified=bool(cfg.checkpoint.allow_unverified))
  if branch == MERGED:
    weights = None
    if cfg.rl is not None and cfg.rl.merge_weights:
      weights = [cfg.rl.merge_weights.get(name, 0.0) for name in names]
    params = stacked_lib.merge(stacked, weights)
  else:
    params = stacked_lib.take_expert(stacked, names.index(branch))
  return cfg, setup.model_cfg, params


def export_run(workdir: str, out_dir: str, *, branch: str = MERGED, dtype: str = "bfloat16",
               overwrite: bool = False, language_model_only: bool = False) -> None:
  """Writes the run's policy to out_dir as a Hugging Face checkpoint directory.

  An existing out_dir (other than an empty directory) is refused unless overwrite, which
  replaces it whole. The files go to a temporary sibling directory first and are renamed
  into place at the end, so a failed export leaves nothing half-written at out_dir; they
  are readable by everyone (files 0644, directories 0755)."""
  check_out_dir(out_dir, overwrite)
  cfg, model_cfg, params = load_run_policy(workdir, branch)
  params = jax.tree.map(np.asarray, params)
  staging = f"{os.path.abspath(out_dir).rstrip(os.sep)}.partial-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  try:
    try:
      policy_of(model_cfg).export_hf(
          staging, params, source_dir=cfg.init.hf_checkpoint,
          tokenizer_dir=policy_setup.hf_tokenizer_dir(cfg) if cfg.init.hf_checkpoint else None,
          dtype=dtype, language_model_only=language_model_only)
    except ValueError as err:
      raise ValueError(f"{workdir}: {err}") from err
    make_readable(staging)
    replace_dir(staging, out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def check_out_dir(out_dir: str, overwrite: bool) -> None:
  """ValueError when out_dir exists (a file, or a directory with anything in it) and
  overwrite is False."""
  if not os.path.lexists(out_dir):
    return
  if os.path.isdir(out_dir) and not os.path.islink(out_dir) and not os.listdir(out_dir):
    return
  if not overwrite:
    raise ValueError(f"--out={out_dir} already exists; choose a new directory or pass "
                     "--overwrite to replace it")
  if not os.path.isdir(out_dir) or os.path.islink(out_dir):
    raise ValueError(f"--out={out_dir} exists and is not a directory; --overwrite replaces "
                     "a previous export directory only")


def make_readable(directory: str) -> None:
  """Files 0644 and directories 0755 under directory (safetensors writes 0600)."""
  os.chmod(directory, 0o755)
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      os.chmod(os.path.join(root, name), 0o755)
    for name in files:
      os.chmod(os.path.join(root, name), 0o644)


def replace_dir(staging: str, out_dir: str) -> None:
  """Renames staging to out_dir; an existing out_dir (checked by check_out_dir) is moved
  aside first and removed once the new one is in place."""
  old = None
  if os.path.lexists(out_dir):
    old = f"{os.path.abspath(out_dir).rstrip(os.sep)}.replaced-{os.getpid()}"
    os.replace(out_dir, old)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  os.replace(staging, out_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's directory (runs/<name>-<hash>); "
                               "or give --config instead.")
_CONFIG = cli.config_flag("The run's config with the same overrides as the training command: "
                          "the run directory is found as copd_jax.main names it.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the HF checkpoint to (must not "
                           "exist, unless --overwrite).")
_BRANCH = flags.DEFINE_string("branch", MERGED, "'merged' or a branch name.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out directory.")
_LANGUAGE_MODEL_ONLY = flags.DEFINE_bool(
    "language_model_only", False, "A toy run's model has a vision tower, which a "
    "Qwen3ForCausalLM cannot hold: export the language model without it.")


def run_workdir() -> str:
  """--workdir, or the run directory --config (with its overrides) resolves to."""
  config_given = _CONFIG.value is not None
  if _WORKDIR.value and config_given:
    raise app.UsageError("give --workdir or --config, not both")
  if _WORKDIR.value:
    return _WORKDIR.value
  if not config_given:
    raise app.UsageError("--workdir or --config is required (see --help)")
  return cli.config_from_flag("config").workdir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUT.value:
    raise app.UsageError("--out is required (see --help)")
  workdir = run_workdir()
  export_run(workdir, _OUT.value, branch=_BRANCH.value, dtype=_DTYPE.value,
             overwrite=_OVERWRITE.value, language_model_only=_LANGUAGE_MODEL_ONLY.value)
  print(f"exported {_BRANCH.value} policy of {workdir} to {_OUT.value}", flush=True)


if __name__ == "__main__":
  cli.run(main, __doc__)
