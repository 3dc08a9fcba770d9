"""Qwen3-VL checkpoint import: a Hugging Face Qwen3-VL directory (config.json +
safetensors) -> (Qwen3VLConfig, f32 params of copd_jax.models.qwen3_vl).

    cfg, params = load_qwen3_vl("/path/to/Qwen3-VL-4B-Instruct")        # streams safetensors

hf_name_to_path maps a HF tensor name to our parameter path and its transform (the
name table is in qwen3_vl's docstring); qwen3_vl_export inverts it. Layer counts are
checked against the safetensors headers before any shape is built (check_layer_counts).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from copd_jax.models.qwen3_vl import Params, param_shapes
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig, VisionTowerConfig


def hf_name_to_path(name: str) -> tuple[tuple[str, ...], str] | None:
  """HF tensor name -> (our parameter path, transform) or None if it is not ours.

  transform: "as_is", "transpose" (Linear weight [out, in] -> kernel [in, out]) or
  "conv_to_kernel" (Conv3d weight [W, C, Tp, P, P] -> kernel [C*Tp*P*P, W]).
  """
  if name == "lm_head.weight":
    return ("lm_head", "kernel"), "transpose"
  for prefix, root in (("model.language_model.", ()), ("model.visual.", ("visual",))):
    if name.startswith(prefix):
      break
  else:
    return None
  parts = name[len(prefix):].split(".")
  path: list[str] = list(root)
  for part in parts[:-1]:
    if part.isdigit() and path and path[-1] in ("layers", "blocks", "deepstack_merger_list"):
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  leaf = parts[-1]
  if path[-2:] == ["patch_embed", "proj"]:
    path.pop()
    return tuple(path) + (("kernel",) if leaf == "weight" else (leaf,)), (
        "conv_to_kernel" if leaf == "weight" else "as_is")
  if path[-1] == "pos_embed" and leaf == "weight":
    return tuple(path), "as_is"  # a bare self.param, not an nn.Embed
  if path[-1] == "embed_tokens" and leaf == "weight":
    return tuple(path) + ("embedding",), "as_is"
  if leaf == "bias":
    return tuple(path) + ("bias",), "as_is"
  if leaf != "weight":
    return None
  if "norm" in path[-1]:
    return tuple(path) + ("scale",), "as_is"
  return tuple(path) + ("kernel",), "transpose"


def _transform(array: np.ndarray, how: str) -> np.ndarray:
  if how == "transpose":
    return array.T
  if how == "conv_to_kernel":
    return array.reshape(array.shape[0], -1).T
  return array


def _hf_shape(shape: tuple[int, ...], how: str, vcfg: VisionTowerConfig) -> tuple[int, ...]:
  if how == "transpose":
    return shape[::-1]
  if how == "conv_to_kernel":
    return (shape[1], vcfg.in_channels, vcfg.temporal_patch_size, vcfg.patch_size,
            vcfg.patch_size)
  return shape


def _indexes_under(index_names, prefix: str) -> set[int]:
  """{i} of every tensor named '<prefix><i>.<...>' (layer / block numbers present)."""
  out = set()
  for name in index_names:
    if name.startswith(prefix):
      head = name[len(prefix):].split(".", 1)[0]
      if head.isdigit():
        out.add(int(head))
  return out


def check_layer_counts(directory: str, cfg: Qwen3VLConfig, index=None) -> None:
  """The config's text layers, vision blocks and deepstack mergers must all be present in
  the safetensors headers: checked from the headers alone, before any shape is built, so
  a config.json claiming 10**8 layers is an error, not hours of tracing."""
  from copd_jax.models import hf_checkpoint
  if index is None:
    index = hf_checkpoint.tensor_index(hf_checkpoint.safetensors_files(directory))
  config = os.path.join(directory, hf_checkpoint.CONFIG_FILE)
  for field, count, prefix, what in (
      ("text_config.num_hidden_layers", cfg.text.num_layers, "model.language_model.layers.",
       "decoder layers"),
      ("vision_config.depth", cfg.vision.depth, "model.visual.blocks.", "vision blocks"),
      ("vision_config.deepstack_visual_indexes", len(cfg.vision.deepstack_visual_indexes),
       "model.visual.deepstack_merger_list.", "deepstack mergers")):
    present = _indexes_under(index, prefix)
    missing = [i for i in range(min(count, max(present, default=-1) + 2)) if i not in present]
    if count > len(present) or missing:
      raise hf_checkpoint.HFCheckpointError(
          f"{config}: {field} asks for {count} {what}, but the safetensors files hold "
          f"{len(present)}" + (f" (first missing: {missing[0]})" if missing else ""))


def load_qwen3_vl(directory: str, *, dtype: str = "float32") -> tuple[Qwen3VLConfig, Params]:
  """Reads a HF Qwen3-VL checkpoint directory (config.json + safetensors) -> (cfg, f32 params).

  Tensors are streamed one at a time with the safetensors numpy API (bf16 via ml_dtypes),
  converted to f32 and placed; the host never holds two copies of the checkpoint. `dtype`
  is the compute dtype recorded in cfg.text.dtype. Missing, unexpected or mis-shaped
  tensors raise ValueError naming the file and tensor.
  """
  # The safetensors reading (headers first, then one tensor at a time) is the Qwen3 text
  # loader's; only the name mapping and the shapes are Qwen3-VL's.
  from copd_jax.models import hf_checkpoint
  config = hf_checkpoint.read_hf_config(directory)
  try:
    cfg = Qwen3VLConfig.from_hf(config, dtype=dtype)
  except ValueError as e:
    raise hf_checkpoint.HFCheckpointError(f"{os.path.join(directory, 'config.json')}: {e}") from e
  # Headers first: the config's sizes are checked against them before any shape is built.
  index = hf_checkpoint.tensor_index(hf_checkpoint.safetensors_files(directory))
  check_layer_counts(directory, cfg, index)
  expected = param_shapes(cfg)
  loads = []  # (hf name, param path, transform), checked before any data is read
  for name, info in index.items():
    mapped = hf_name_to_path(name)
    if mapped is None or (mapped[0] not in expected and not (
        name == "lm_head.weight" and cfg.text.tie_embeddings)):
      raise ValueError(f"{info.file}: unexpected tensor {name!r}")
    path, how = mapped
    if path not in expected:
      continue  # a tied checkpoint that still stores lm_head.weight: the embedding is used
    want = _hf_shape(expected[path], how, cfg.vision)
    if info.shape != want:
      raise ValueError(f"{info.file}: tensor {name!r} has shape {info.shape}, expected {want}")
    if info.dtype not in hf_checkpoint.FLOAT_TENSOR_DTYPES:
      raise hf_checkpoint.HFCheckpointError(
          f"{info.file}: tensor {name!r} has dtype {info.dtype}; expected one of "
          f"{hf_checkpoint.FLOAT_TENSOR_DTYPES}")
    loads.append((name, path, how))
  missing = sorted(set(expected) - {path for _, path, _ in loads})
  if missing:
    raise ValueError(f"{directory}: checkpoint is missing tensors for "
                     f"{['/'.join(p) for p in missing]}")
  params: dict = {}
  for name, path, how in loads:
    array = hf_checkpoint.read_tensor(index[name].file, name)
    finite = np.isfinite(array)
    if not finite.all():  # a NaN weight would only show up later as a NaN loss
      raise hf_checkpoint.HFCheckpointError(
          f"{index[name].file}: tensor {name!r} holds {int(finite.size - finite.sum())} "
          "NaN/inf values")
    del finite
    hf_checkpoint.set_path(params, path, jnp.asarray(_transform(array, how).astype(np.float32)))
  return cfg, params
