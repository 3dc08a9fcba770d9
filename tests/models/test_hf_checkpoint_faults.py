"""Hugging Face checkpoints with bad headers, bytes or weights: errors name the file or
tensor (issue 13.11).

Each case reproduces a failure found by trying the project with bad input and injected faults,
and checks the behaviour that replaced it. Expected values are written out by hand."""
import json
import os

import numpy as np
import pytest

import paths


# ------------------------------------------- 13.11 HF checkpoint and chat template errors

HF_FIXTURES = os.path.join(paths.HF_FIXTURES, "qwen3_tiny")


def _copy_checkpoint(tmp_path, name="untied_f32"):
  import shutil
  target = tmp_path / name
  shutil.copytree(os.path.join(HF_FIXTURES, name), target)
  return target


def test_huge_layer_count_in_config_fails_on_headers_first(tmp_path):
  from copd_jax.models import hf_checkpoint
  ckpt = _copy_checkpoint(tmp_path)
  config = json.loads((ckpt / "config.json").read_text())
  config["num_hidden_layers"] = 10**8
  (ckpt / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_checkpoint.HFCheckpointError,
                     match=r"config\.json: 'num_hidden_layers' is 100000000, but the "
                           r"safetensors files hold \d+ layers"):
    hf_checkpoint.load_qwen3(str(ckpt))


def test_non_utf8_hf_config_names_the_file(tmp_path):
  from copd_jax.models import hf_checkpoint
  ckpt = _copy_checkpoint(tmp_path)
  (ckpt / "config.json").write_bytes(b'{"model_type": "qwen3\xff"}')
  with pytest.raises(hf_checkpoint.HFCheckpointError, match=r"config\.json: not UTF-8"):
    hf_checkpoint.read_hf_config(str(ckpt))


def test_nan_weight_in_hf_checkpoint_names_the_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file

  from copd_jax.models import hf_checkpoint
  ckpt = _copy_checkpoint(tmp_path)
  tensors = load_file(str(ckpt / "model.safetensors"))
  name = "model.layers.0.mlp.up_proj.weight"
  tensors[name] = tensors[name].copy()
  tensors[name][1, 2] = np.nan
  save_file(tensors, str(ckpt / "model.safetensors"))
  with pytest.raises(hf_checkpoint.HFCheckpointError,
                     match=rf"model\.safetensors: tensor '{re_escape(name)}' holds 1 NaN/inf"):
    hf_checkpoint.load_qwen3(str(ckpt))


def re_escape(text):
  import re
  return re.escape(text)
