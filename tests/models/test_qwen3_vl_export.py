"""Qwen3-VL export (models/qwen3_vl_export.py): the f32 export of the imported tiny fixture
is the transformers-written file again, tensor by tensor; reloading an export gives the
same logits; bad inputs name what is wrong."""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

import paths
from test_qwen3_vl_import import FIXTURE, _logits

from copd_jax.models import hf_checkpoint, qwen3_vl, qwen3_vl_export, qwen3_vl_import


@pytest.fixture(scope="module")
def loaded():
  return qwen3_vl_import.load_qwen3_vl(FIXTURE)


@pytest.fixture(scope="module")
def ref():
  return paths.reference_outputs(FIXTURE)


def _tensors(directory):
  index = hf_checkpoint.tensor_index(hf_checkpoint.safetensors_files(directory))
  return {name: hf_checkpoint.read_tensor(info.file, name) for name, info in index.items()}


def test_float32_export_is_the_transformers_file_again(loaded, tmp_path):
  cfg, params = loaded
  qwen3_vl_export.export_qwen3_vl(str(tmp_path), params, cfg, source_dir=FIXTURE,
                                  dtype="float32")
  want, got = _tensors(FIXTURE), _tensors(tmp_path)
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  config = json.load(open(tmp_path / "config.json"))
  assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
  assert os.path.isfile(tmp_path / "generation_config.json")  # processor files travel too


@pytest.mark.parametrize("kind", ["image", "mixed"])
def test_reloaded_export_gives_the_same_logits(loaded, ref, kind, tmp_path):
  cfg, params = loaded
  # Trained weights differ from the fixture's: perturb them so the test is not a copy.
  rng = np.random.default_rng(0)
  trained = jax.tree.map(lambda x: x + 0.01 * rng.normal(size=x.shape).astype(np.float32),
                         params)
  qwen3_vl_export.export_qwen3_vl(str(tmp_path / "f32"), trained, cfg, source_dir=FIXTURE,
                                  dtype="float32")
  cfg32, back = qwen3_vl_import.load_qwen3_vl(str(tmp_path / "f32"))
  np.testing.assert_array_equal(_logits(back, cfg32, ref, kind), _logits(trained, cfg, ref, kind))
  # bfloat16 (as released checkpoints): the weights are the bf16-rounded ones exactly.
  qwen3_vl_export.export_qwen3_vl(str(tmp_path / "bf16"), trained, cfg, source_dir=FIXTURE)
  _, back16 = qwen3_vl_import.load_qwen3_vl(str(tmp_path / "bf16"))
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                         trained)
  for a, b in zip(jax.tree.leaves(back16), jax.tree.leaves(rounded)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"


def test_export_rejects_params_that_do_not_fit_the_config(loaded, tmp_path):
  cfg, params = loaded
  broken = jax.tree.map(lambda x: x, params)
  del broken["visual"]["merger"]
  with pytest.raises(ValueError, match="missing.*visual/merger"):
    qwen3_vl_export.export_qwen3_vl(str(tmp_path), broken, cfg, source_dir=FIXTURE)
  reshaped = jax.tree.map(lambda x: x, params)
  reshaped["norm"]["scale"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="norm/scale has shape"):
    qwen3_vl_export.export_qwen3_vl(str(tmp_path), reshaped, cfg, source_dir=FIXTURE)
  other = tmp_path / "other"
  other.mkdir()
  config = json.load(open(os.path.join(FIXTURE, "config.json")))
  config["text_config"]["num_hidden_layers"] = 3
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="describes another model"):
    qwen3_vl_export.export_qwen3_vl(str(tmp_path / "out"), params, cfg, source_dir=str(other))


def test_every_parameter_name_round_trips_through_the_importer(loaded):
  cfg, _ = loaded
  for path in qwen3_vl.param_shapes(cfg):
    assert qwen3_vl_import.hf_name_to_path(qwen3_vl_export.hf_name(path))[0] == path
