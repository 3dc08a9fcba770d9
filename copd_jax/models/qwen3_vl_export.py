"""Export Qwen3-VL parameters as a Hugging Face checkpoint directory (the inverse of
models.qwen3_vl_import.load_qwen3_vl).

    export_qwen3_vl("/models/copd-merged", params, cfg, source_dir="/models/Qwen3-VL-4B-Instruct")

Training changes weights, not the architecture, so config.json is the source checkpoint's
(its `dtype` / `torch_dtype` set to the export dtype), and the files a processor needs
(preprocessor_config.json, video_preprocessor_config.json, chat template, tokenizer) are
copied from it. Tensor names are built from our parameter paths; every name is checked to
map back to its path through the importer's own mapping (qwen3_vl_import.hf_name_to_path), so
import and export cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Mapping

import jax
import numpy as np

from copd_jax.models import hf_checkpoint, layer_stack
from copd_jax.models.qwen3_vl import param_shapes
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig
from copd_jax.models.qwen3_vl_import import _hf_shape, hf_name_to_path

# What a Qwen3-VL processor reads besides the weights; copied when the source has them.
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja", "generation_config.json",
                   "processor_config.json") + tuple(hf_checkpoint.TOKENIZER_FILES)
_NUMBERED = ("layers", "blocks", "deepstack_merger_list")


def _hf_module_path(path: tuple[str, ...]) -> list[str]:
  """Our module path -> HF's dotted parts: 'layers_3' -> 'layers', '3'."""
  parts = []
  for part in path:
    stem, _, number = part.rpartition("_")
    if stem in _NUMBERED and number.isdigit():
      parts += [stem, number]
    else:
      parts.append(part)
  return parts


def hf_name(path: tuple[str, ...]) -> str:
  """Our parameter path -> the HF tensor name (qwen3_vl_import.hf_name_to_path inverted)."""
  if path == ("lm_head", "kernel"):
    return "lm_head.weight"
  visual = path[0] == "visual"
  prefix = "model.visual." if visual else "model.language_model."
  *module, leaf = path[1:] if visual else path
  parts = _hf_module_path(tuple(module))
  if parts[-1:] == ["patch_embed"]:
    parts.append("proj")
  if leaf == "pos_embed":  # a bare parameter, not inside a module
    return prefix + ".".join(parts + ["pos_embed", "weight"])
  hf_leaf = "bias" if leaf == "bias" else "weight"
  return prefix + ".".join(parts + [hf_leaf])


def _to_hf_layout(array: np.ndarray, how: str, hf_shape: tuple[int, ...]) -> np.ndarray:
  if how == "transpose":
    return array.T
  if how == "conv_to_kernel":  # kernel [C*Tp*P*P, W] -> Conv3d weight [W, C, Tp, P, P]
    return array.T.reshape(hf_shape)
  return array


def named_hf_arrays(params: Mapping, cfg: Qwen3VLConfig) -> list[tuple[str, np.ndarray]]:
  """(HF name, host array in HF layout) of every parameter, shapes checked against cfg.
  Scanned (stacked) layer parameters are unstacked first: HF numbers its layers."""
  params = layer_stack.to_layout(params, scan_layers=False)
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, scan_layers=False))
  expected = param_shapes(cfg)
  flat = {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  if set(flat) != set(expected):
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(expected))
    raise ValueError(f"export_qwen3_vl: params do not match the config: missing {missing}, "
                     f"unexpected {extra}")
  out = []
  for path in sorted(expected):
    array = np.asarray(flat[path])
    if array.shape != expected[path]:
      raise ValueError(f"export_qwen3_vl: params {'/'.join(path)} has shape {array.shape}; "
                       f"the config implies {expected[path]}")
    name = hf_name(path)
    mapped = hf_name_to_path(name)
    if mapped is None or mapped[0] != path:  # the importer must read it back to this path
      raise AssertionError(f"export name {name!r} maps back to {mapped}, not {path}")
    how = mapped[1]
    out.append((name, _to_hf_layout(array, how, _hf_shape(array.shape, how, cfg.vision))))
  return out


def export_qwen3_vl(directory: str, params: Mapping, cfg: Qwen3VLConfig, *, source_dir: str,
                    dtype: str = "bfloat16",
                    max_shard_bytes: int = hf_checkpoint.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes `params` as a HF Qwen3VLForConditionalGeneration directory that transformers
  and load_qwen3_vl read. dtype: "bfloat16" (as released) or "float32" (bit-exact round
  trip). source_dir: the checkpoint the params came from (its config.json and processor
  files are reused). Returns the files written or copied."""
  if dtype not in hf_checkpoint.EXPORT_DTYPES:
    raise ValueError(f"export_qwen3_vl: dtype must be one of "
                     f"{tuple(hf_checkpoint.EXPORT_DTYPES)}, got {dtype!r}")
  config = hf_checkpoint.read_hf_config(source_dir)
  source_cfg = Qwen3VLConfig.from_hf(config, dtype=cfg.text.dtype).with_execution_of(cfg)
  if source_cfg != cfg:
    raise ValueError(f"export_qwen3_vl: {source_dir}/config.json describes another model "
                     "than the params' config")
  os.makedirs(directory, exist_ok=True)
  written = hf_checkpoint.write_safetensors_shards(
      directory, named_hf_arrays(params, cfg), dtype=hf_checkpoint.EXPORT_DTYPES[dtype],
      max_shard_bytes=max_shard_bytes)
  for name in PROCESSOR_FILES:
    source = os.path.join(source_dir, name)
    if os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(
        os.path.join(directory, name)):
      shutil.copyfile(source, os.path.join(directory, name))
      written.append(os.path.join(directory, name))
  config = dict(config, dtype=dtype)
  if "torch_dtype" in config:
    config["torch_dtype"] = dtype
  path = os.path.join(directory, hf_checkpoint.CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(config, f, indent=2)
  os.replace(path + ".tmp", path)
  return written + [path]
