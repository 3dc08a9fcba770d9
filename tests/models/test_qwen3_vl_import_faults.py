"""The Qwen3-VL importer as strict as the text one (issue 30, item 5).

Found on main: NaN weights loaded silently; param_shapes ran eval_shape before any header
was read, so text_config.num_hidden_layers = 1e8 grew memory without bound and vision
depth = 1e8 hung; rope_theta Infinity loaded silently; a malformed
model.safetensors.index.json raised raw TypeError / AttributeError / UnicodeDecodeError /
RecursionError; a 5000-digit integer in config.json raised a raw ValueError; and
partial_rotary_factor = 0.5 in a (text) Qwen3 config was silently ignored. Each is now an
HFCheckpointError naming the file and the field or tensor."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import paths
from copd_jax.models import hf_checkpoint, qwen3_vl_import
from copd_jax.models.hf_checkpoint import HFCheckpointError

FIXTURES = os.path.join(paths.TESTS, "fixtures", "hf")
VL = os.path.join(FIXTURES, "qwen3_vl_tiny")
TEXT = os.path.join(FIXTURES, "qwen3_tiny", "untied_f32")
SHARDED = os.path.join(FIXTURES, "qwen3_tiny", "tied_bf16_sharded")


def copy_of(source, tmp_path, name="ckpt") -> str:
  out = tmp_path / name
  shutil.copytree(source, out, ignore=shutil.ignore_patterns("reference*"))
  return str(out)


def edit_config(directory, edit) -> None:
  path = os.path.join(directory, "config.json")
  config = json.load(open(path))
  edit(config)
  with open(path, "w") as f:
    json.dump(config, f)  # allow_nan: writes Infinity / NaN as Python does


def load_vl(directory):
  return qwen3_vl_import.load_qwen3_vl(directory)


def load_text(directory):
  return hf_checkpoint.load_qwen3(directory)


@pytest.fixture
def no_shapes_built(monkeypatch):
  """Fails the test if anything traces the model's shapes (eval_shape)."""
  def boom(*args, **kwargs):
    raise AssertionError("eval_shape was called before the headers were checked")
  monkeypatch.setattr(jax, "eval_shape", boom)


# ------------------------------------------------------------------ weights


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nan_or_inf_weight_is_a_named_error(tmp_path, bad):
  directory = copy_of(VL, tmp_path)
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  name = "model.language_model.layers.1.mlp.up_proj.weight"
  tensors[name] = tensors[name].copy()
  tensors[name][3, 5] = bad
  save_file(tensors, path)
  with pytest.raises(HFCheckpointError, match=rf"model\.safetensors: tensor '{name}' holds 1 "
                                              "NaN/inf values"):
    load_vl(directory)


# ------------------------------------------------------------ sizes before shapes


@pytest.mark.parametrize("section, field, what", [
    ("text_config", "num_hidden_layers", "decoder layers"),
    ("vision_config", "depth", "vision blocks")])
@pytest.mark.parametrize("count", [10 ** 6, 10 ** 8, 2 ** 62])
def test_a_huge_layer_count_is_named_from_the_headers_before_any_shape(
    tmp_path, no_shapes_built, section, field, what, count):
  directory = copy_of(VL, tmp_path)
  edit_config(directory, lambda c: c[section].update({field: count}))
  with pytest.raises(HFCheckpointError, match=rf"config\.json: {section}\.{field} asks for "
                                              rf"{count} {what}, but the safetensors files hold"):
    load_vl(directory)


def test_a_layer_gap_in_the_headers_is_named(tmp_path, no_shapes_built):
  directory = copy_of(VL, tmp_path)
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  for name in [n for n in tensors if n.startswith("model.language_model.layers.1.")]:
    tensors[name.replace("layers.1.", "layers.5.")] = tensors.pop(name)
  save_file(tensors, path)
  with pytest.raises(HFCheckpointError, match=r"num_hidden_layers asks for 2 decoder layers, "
                                              r"but the safetensors files hold 2 \(first missing: 1\)"):
    load_vl(directory)


@pytest.mark.parametrize("loader, source, section", [
    (load_vl, VL, "text_config"), (load_text, TEXT, None)])
def test_an_absurd_dimension_is_named(tmp_path, loader, source, section):
  directory = copy_of(source, tmp_path)
  edit_config(directory, lambda c: (c[section] if section else c).update(hidden_size=2 ** 40))
  with pytest.raises(HFCheckpointError, match=r"hidden_size.*1099511627776"):
    loader(directory)


# ------------------------------------------------------------------ config values


@pytest.mark.parametrize("loader, source, where", [
    (load_vl, VL, ("text_config", "rope_parameters")),
    (load_vl, VL, ("vision_config", "rope_parameters")),
    (load_text, TEXT, ("rope_parameters",))])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_config_float_is_named(tmp_path, loader, source, where, value):
  directory = copy_of(source, tmp_path)

  def edit(config):
    node = config
    for key in where:
      node = node[key]
    node["rope_theta"] = value
  edit_config(directory, edit)
  with pytest.raises(HFCheckpointError, match=rf"config\.json: {'.'.join(where)}\.rope_theta is "
                                              rf"{value}; every number must be finite"):
    loader(directory)


@pytest.mark.parametrize("loader, source", [(load_vl, VL), (load_text, TEXT)])
def test_a_5000_digit_integer_in_config_json_is_named(tmp_path, loader, source):
  directory = copy_of(source, tmp_path)
  path = os.path.join(directory, "config.json")
  text = open(path).read()
  text = text.replace('"vocab_size": ', '"vocab_size": ' + "9" * 5000 + ", \"_x\": ", 1)
  open(path, "w").write(text)
  with pytest.raises(HFCheckpointError, match=r"config\.json: unreadable JSON value"):
    loader(directory)


@pytest.mark.parametrize("loader, source, where", [
    (load_text, TEXT, ()), (load_text, TEXT, ("rope_parameters",)),
    (load_vl, VL, ("text_config",)), (load_vl, VL, ("text_config", "rope_parameters"))])
def test_partial_rotary_factor_is_rejected_naming_it(tmp_path, loader, source, where):
  directory = copy_of(source, tmp_path)

  def edit(config):
    node = config
    for key in where:
      node = node[key]
    node["partial_rotary_factor"] = 0.5
  edit_config(directory, edit)
  with pytest.raises(HFCheckpointError, match=r"partial_rotary_factor is 0\.5; only full "
                                              "rotary"):
    loader(directory)


def test_partial_rotary_factor_of_one_is_what_we_compute(tmp_path):
  directory = copy_of(TEXT, tmp_path)
  edit_config(directory, lambda c: c.update(partial_rotary_factor=1.0))
  cfg, _ = load_text(directory)
  assert cfg.num_layers == 2


@pytest.mark.parametrize("loader, source, where, field", [
    (load_text, TEXT, (), "sliding_window_pattern"),
    (load_text, TEXT, ("rope_parameters",), "factor"),
    (load_vl, VL, (), "text_config_extra"),
    (load_vl, VL, ("text_config",), "use_qk_norm_v2"),
    (load_vl, VL, ("text_config", "rope_parameters"), "factor"),
    (load_vl, VL, ("vision_config",), "window_size")])
def test_a_field_we_do_not_implement_is_rejected_naming_it(tmp_path, loader, source, where,
                                                          field):
  directory = copy_of(source, tmp_path)

  def edit(config):
    node = config
    for key in where:
      node = node[key]
    node[field] = 2
  edit_config(directory, edit)
  with pytest.raises(HFCheckpointError, match=rf"'{field}' is not implemented"):
    loader(directory)


# ------------------------------------------------------------------ the shard index


def sharded_with_index(tmp_path, index_bytes: bytes) -> str:
  directory = copy_of(SHARDED, tmp_path)
  with open(os.path.join(directory, "model.safetensors.index.json"), "wb") as f:
    f.write(index_bytes)
  return directory


@pytest.mark.parametrize("index_bytes, message", [
    (b'{"weight_map": 7}', r"'weight_map' must be a non-empty object .* got int"),
    (b'{"weight_map": ["a.safetensors"]}', r"'weight_map' must be a non-empty object .* got list"),
    (b'[1, 2]', r"'weight_map' must be a non-empty object"),
    (b'{"weight_map": {"model.norm.weight": 3}}', r"weight_map\['model.norm.weight'\] must be a "
                                                  "shard file name"),
    (b'{"weight_map": {"x": "\xff\xfe.safetensors"}}', r"not UTF-8 \(byte offset"),
    (b'{"a": ' * 100_000 + b'1' + b'}' * 100_000, r"nested"),
    (b'[' * 100 + b']' * 100, r"nested more than 32 levels"),
])
def test_a_malformed_index_is_a_named_error(tmp_path, index_bytes, message):
  directory = sharded_with_index(tmp_path, index_bytes)
  with pytest.raises(HFCheckpointError, match=r"model\.safetensors\.index\.json: .*" + message):
    hf_checkpoint.safetensors_files(directory)
  with pytest.raises(HFCheckpointError, match=r"model\.safetensors\.index\.json"):
    load_text(directory)


def test_the_fixtures_still_load(tmp_path):
  cfg, params = load_vl(VL)
  assert cfg.text.num_layers == 2 and cfg.vision.depth == 3
  assert len(hf_checkpoint.safetensors_files(SHARDED)) == 3
