"""Hugging Face Qwen3 checkpoints <-> our parameters, with the `safetensors` numpy API.

No torch at run time. A Qwen3 (text) checkpoint directory holds

    config.json                          a Qwen3ForCausalLM config (model_type "qwen3")
    model.safetensors                    all tensors, or
    model.safetensors.index.json         {"weight_map": {tensor name: shard file}} plus
    model-0000k-of-0000n.safetensors     the shards it names
    tokenizer.json, tokenizer_config.json, ...   (see copd_jax.data.hf_tokenizer)

Public API
----------
    cfg = model_config_from_hf(json.load(open("config.json")), dtype="bfloat16")
    cfg, params = load_qwen3(directory)                  # params: f32 pytree (jax arrays)
    export_qwen3(out_dir, params, cfg, tokenizer_dir=directory, dtype="bfloat16")
Helpers other importers reuse (e.g. Qwen3-VL): `safetensors_files`, `tensor_index`,
`read_tensor`, `iter_tensors`, `to_param_array`, `to_device_param`, `write_safetensors_shards`.
config.json reading, its checks and Qwen3's config <-> ModelConfig are in
copd_jax.models.hf_config (model_config_from_hf, read_hf_config, HFCheckpointError are
imported here too).

Name mapping (see copd_jax.models.decoder's docstring; D = d_model, H/K = query/kv heads,
Dh = head_dim, M = mlp_dim, V = vocab_size)
-----------------------------------------------------------------------------
    model.embed_tokens.weight [V, D]                 -> embed_tokens/embedding [V, D]
    model.layers.{i}.input_layernorm.weight [D]      -> layers_{i}/input_layernorm/scale
    model.layers.{i}.self_attn.q_proj.weight [H*Dh, D] -> layers_{i}/self_attn/q_proj/kernel [D, H*Dh]
    ... k_proj/v_proj [K*Dh, D], o_proj [D, H*Dh], q_norm/k_norm [Dh],
    post_attention_layernorm [D], mlp.gate_proj/up_proj [M, D], mlp.down_proj [D, M]
    model.norm.weight [D]                            -> norm/scale
    lm_head.weight [V, D] (untied only)              -> lm_head/kernel [D, V]
Every HF `*_proj.weight` ([out, in], torch Linear) is TRANSPOSED into our `kernel`
([in, out]); norm weights and the embedding are copied as they are.

Memory: loading streams. Each tensor is read from its shard, converted (cast + transpose)
into its final array and handed to jax before the next one is read, so the host never
holds the checkpoint twice (experiments/bench_import.py measures peak RSS / size on disk).
Tensors that are safe to drop are listed in IGNORED_TENSOR_SUFFIXES and logged.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from copd_jax.models import layer_stack, model_config
from copd_jax.models.hf_config import (
    CONFIG_FILE, HFCheckpointError, hf_config_from_model, load_json_file, model_config_from_hf,
    read_hf_config)

log = logging.getLogger(__name__)


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# Buffers some exporters save that carry no learned weights (recomputed from the config).
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


# Files copied next to an export when a tokenizer directory is given (those that exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "generation_config.json")


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


# safetensors dtype tags we can convert to float parameters.
FLOAT_TENSOR_DTYPES = ("F32", "F16", "BF16", "F64")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def check_layers_present(directory: str, cfg: model_config.ModelConfig,
                         index: Mapping[str, "TensorInfo"] | None = None) -> None:
  """config.json's num_hidden_layers must match the layers the safetensors headers hold:
  checked from the headers alone, before anything sized by the config is built (a
  config saying 10**8 layers must not allocate first and fail later)."""
  index = tensor_index(safetensors_files(directory)) if index is None else index
  layers = {name.split(".")[2] for name in index if name.startswith("model.layers.")}
  present = sum(1 for layer in layers if layer.isdigit())
  if present != cfg.num_layers:
    raise HFCheckpointError(
        f"{os.path.join(directory, CONFIG_FILE)}: 'num_hidden_layers' is {cfg.num_layers}, but "
        f"the safetensors files hold {present} layers")


class TensorSpec(NamedTuple):
  """One HF tensor and where it lives in our pytree.

  hf_shape is HF's layout; transpose says our array is its transpose (Linear weights).
  """
  hf_name: str
  param_path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  transpose: bool


def qwen3_tensor_specs(cfg: model_config.ModelConfig) -> list[TensorSpec]:
  """Every tensor of a Qwen3ForCausalLM checkpoint for `cfg`, in checkpoint order."""
  d, hd, m, v = cfg.d_model, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
  specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), (v, d), False)]
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}", f"layers_{i}"
    linear = lambda name, group, out, inp: TensorSpec(  # noqa: E731
        f"{hf}.{group}.{name}.weight", (ours, group, name, "kernel"), (out, inp), True)
    norm = lambda hf_name, path, size: TensorSpec(  # noqa: E731
        f"{hf}.{hf_name}.weight", (ours, *path, "scale"), (size,), False)
    specs += [
        norm("input_layernorm", ("input_layernorm",), d),
        linear("q_proj", "self_attn", q_out, d),
        linear("k_proj", "self_attn", kv_out, d),
        linear("v_proj", "self_attn", kv_out, d),
        linear("o_proj", "self_attn", d, q_out),
        norm("self_attn.q_norm", ("self_attn", "q_norm"), hd),
        norm("self_attn.k_norm", ("self_attn", "k_norm"), hd),
        norm("post_attention_layernorm", ("post_attention_layernorm",), d),
        linear("gate_proj", "mlp", m, d),
        linear("up_proj", "mlp", m, d),
        linear("down_proj", "mlp", d, m),
    ]
  specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), (d,), False))
  if not cfg.tie_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (v, d), True))
  return specs


def safetensors_files(directory: str) -> list[str]:
  """The safetensors files of a checkpoint: model.safetensors, or the shards named by
  model.safetensors.index.json (each must exist). Raises FileNotFoundError otherwise."""
  index_path = os.path.join(directory, INDEX_FILE)
  single_path = os.path.join(directory, SINGLE_FILE)
  if os.path.isfile(index_path):
    index = load_json_file(index_path)
    weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
    if not isinstance(weight_map, Mapping) or not weight_map:
      raise HFCheckpointError(f"{index_path}: not a safetensors index: 'weight_map' must be a "
                              f"non-empty object of tensor name -> shard file, got "
                              f"{type(weight_map).__name__}")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
      raise HFCheckpointError(f"{index_path}: weight_map[{bad!r}] must be a shard file name "
                              f"(a string), got {weight_map[bad]!r}")
    files = []
    for shard in dict.fromkeys(weight_map.values()):  # unique, in order
      path = os.path.join(directory, shard)
      if os.path.basename(shard) != shard or shard in (".", ".."):
        raise HFCheckpointError(f"{index_path}: shard name {shard!r} must be a plain file name")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{index_path} names shard {shard!r}, which does not exist")
      files.append(path)
    return files
  if os.path.isfile(single_path):
    return [single_path]
  raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


class TensorInfo(NamedTuple):
  file: str
  dtype: str          # safetensors tag, e.g. "BF16"
  shape: tuple[int, ...]


def tensor_index(files: Iterable[str]) -> dict[str, TensorInfo]:
  """Reads only the headers: tensor name -> (file, dtype tag, shape).

  A corrupt or truncated file raises HFCheckpointError naming it (safetensors checks that
  the header's offsets cover the file exactly). A tensor stored in two files is an error.
  """
  index: dict[str, TensorInfo] = {}
  for path in files:
    try:
      with safe_open(path, framework="np") as f:
        for name in f.keys():
          view = f.get_slice(name)
          if name in index:
            raise HFCheckpointError(f"tensor {name!r} is stored in both {index[name].file} "
                                    f"and {path}")
          index[name] = TensorInfo(path, view.get_dtype(), tuple(view.get_shape()))
    except SafetensorError as err:
      raise HFCheckpointError(f"{path}: not a readable safetensors file ({err})") from err
  return index


def read_tensor(path: str, name: str) -> np.ndarray:
  """One tensor as numpy (BF16 comes back as ml_dtypes.bfloat16; safetensors >= 0.4 does
  that itself). The file is opened for this tensor only, so its memory map is released
  right after and never adds the whole file to resident memory."""
  try:
    with safe_open(path, framework="np") as f:
      return f.get_tensor(name)
  except SafetensorError as err:
    raise HFCheckpointError(f"{path}: cannot read tensor {name!r} ({err})") from err


def iter_tensors(index: Mapping[str, TensorInfo], names: Iterable[str]
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) one tensor at a time, in `names` order; drop each before the next."""
  for name in names:
    yield name, read_tensor(index[name].file, name)


def to_param_array(array: np.ndarray, *, transpose: bool, dtype=np.float32) -> np.ndarray:
  """HF tensor -> our layout: cast to `dtype`, transposed for Linear weights; one new
  C-contiguous array (the source can be dropped right after)."""
  source = array.T if transpose else array
  return np.ascontiguousarray(source, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _transpose_on_device(array, dtype: str):
  # XLA's blocked transpose is several times faster than numpy's strided copy.
  return array.T.astype(dtype)


def to_device_param(array: np.ndarray, *, transpose: bool, dtype: str = "float32") -> jax.Array:
  """HF tensor -> our layout as a jax array of `dtype` (transposed on device when needed)."""
  if transpose:
    return _transpose_on_device(array, dtype)
  return jax.device_put(np.asarray(array, dtype=EXPORT_DTYPES[dtype]))


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  """tree[path[0]][path[1]]... = value, creating the nested dicts."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _check_names(index: Mapping[str, TensorInfo], specs: list[TensorSpec],
                 tie_embeddings: bool) -> None:
  wanted = {s.hf_name for s in specs}
  missing = [s.hf_name for s in specs if s.hf_name not in index]
  if missing:
    files = sorted({info.file for info in index.values()})
    raise HFCheckpointError(f"checkpoint is missing {len(missing)} tensor(s) the config needs, "
                            f"e.g. {missing[:5]} (looked in {files})")
  ignored, unexpected = [], []
  for name in index:
    if name in wanted:
      continue
    harmless = name.endswith(IGNORED_TENSOR_SUFFIXES) or (
        tie_embeddings and name == "lm_head.weight")  # tied: HF ties it to the embedding
    (ignored if harmless else unexpected).append(name)
  if unexpected:
    raise HFCheckpointError(
        f"checkpoint has {len(unexpected)} tensor(s) the config does not explain, e.g. "
        + ", ".join(f"{n!r} in {index[n].file}" for n in unexpected[:5]))
  if ignored:
    log.info("load_qwen3: ignoring tensors without learned weights: %s", ignored)


def _check_spec(info: TensorInfo, spec: TensorSpec) -> None:
  if info.dtype not in FLOAT_TENSOR_DTYPES:
    raise HFCheckpointError(f"{info.file}: tensor {spec.hf_name!r} has dtype {info.dtype}; "
                            f"expected one of {FLOAT_TENSOR_DTYPES}")
  if info.shape != spec.hf_shape:
    raise HFCheckpointError(f"{info.file}: tensor {spec.hf_name!r} has shape {list(info.shape)}; "
                            f"config.json implies {list(spec.hf_shape)}")


def load_qwen3(directory: str, *, dtype: str = "float32", param_dtype: str = "float32"
               ) -> tuple[model_config.ModelConfig, dict]:
  """Reads a HF Qwen3ForCausalLM directory -> (ModelConfig, params).

  dtype: ModelConfig's compute dtype. param_dtype: the parameters' storage dtype, "float32"
  (what init_params gives and training expects) or "bfloat16" (half the host/device memory,
  e.g. for a frozen teacher; the model casts matmul inputs anyway).
  params is a nested dict of jax arrays named as in copd_jax.models.decoder. Every header is
  checked (names, shapes, dtypes) before any tensor data is read; errors name the file
  and tensor. Tensors are then streamed one at a time (see the module docstring).
  """
  if param_dtype not in EXPORT_DTYPES:
    raise ValueError(f"param_dtype must be one of {tuple(EXPORT_DTYPES)}, got {param_dtype!r}")
  cfg = model_config_from_hf(read_hf_config(directory), dtype=dtype)
  index = tensor_index(safetensors_files(directory))
  check_layers_present(directory, cfg, index)
  specs = qwen3_tensor_specs(cfg)
  _check_names(index, specs, cfg.tie_embeddings)
  for spec in specs:
    _check_spec(index[spec.hf_name], spec)
  params: dict = {}
  for spec in specs:
    # One tensor in flight: read, convert into its final array, drop the source.
    source = read_tensor(index[spec.hf_name].file, spec.hf_name)
    if not np.isfinite(source).all():  # a NaN weight would only show up as a NaN loss
      raise HFCheckpointError(f"{index[spec.hf_name].file}: tensor {spec.hf_name!r} holds "
                              f"{int(np.size(source) - np.isfinite(source).sum())} NaN/inf values")
    set_path(params, spec.param_path,
              to_device_param(source, transpose=spec.transpose, dtype=param_dtype))
    del source
  return cfg, params


def _param_at(params: Mapping, path: tuple[str, ...]):
  node = params
  for depth, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"export_qwen3: params has no {'/'.join(path[:depth + 1])} "
                       f"(needed for {'/'.join(path)})")
    node = node[key]
  return node


def plan_shards(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
  """Groups consecutive tensors (by byte size) into shards of at most max_shard_bytes
  (a single larger tensor gets a shard of its own). Returns lists of tensor positions."""
  shards: list[list[int]] = [[]]
  used = 0
  for position, size in enumerate(sizes):
    if shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(position)
    used += size
  return shards


def _atomic_save(tensors: dict, path: str) -> None:
  tmp = path + ".tmp"
  save_file(tensors, tmp, metadata={"format": "pt"})  # "pt": transformers expects it
  os.replace(tmp, path)


def _atomic_write_json(obj, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def write_safetensors_shards(directory: str, named_arrays: list[tuple[str, Any]], *,
                             dtype, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                             ) -> list[str]:
  """Writes (HF name, array in HF layout) pairs as model.safetensors, or as
  model-0000k-of-0000n.safetensors + model.safetensors.index.json when they exceed
  max_shard_bytes. Arrays are converted to `dtype` one shard at a time. Returns the
  files written. Stale files of the other layout are removed."""
  itemsize = np.dtype(dtype).itemsize
  sizes = [math.prod(np.shape(a)) * itemsize for _, a in named_arrays]
  shards = plan_shards(sizes, max_shard_bytes)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  weight_map = {}
  for shard_name, positions in zip(names, shards):
    tensors = {}
    for p in positions:
      hf_name, array = named_arrays[p]
      tensors[hf_name] = np.ascontiguousarray(np.asarray(array), dtype=dtype)
      weight_map[hf_name] = shard_name
    _atomic_save(tensors, os.path.join(directory, shard_name))
    del tensors
  index_path = os.path.join(directory, INDEX_FILE)
  if len(shards) > 1:
    _atomic_write_json({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
                       index_path)
  elif os.path.exists(index_path):
    os.remove(index_path)  # a stale index would shadow the new single file
  return [os.path.join(directory, n) for n in names]


def copy_tokenizer_files(tokenizer_dir: str, directory: str) -> list[str]:
  """Copies the tokenizer files that exist in tokenizer_dir (TOKENIZER_FILES)."""
  copied = [name for name in TOKENIZER_FILES
            if os.path.isfile(os.path.join(tokenizer_dir, name))]
  if "tokenizer.json" not in copied:
    raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json to copy")
  for name in copied:
    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
  return copied


def export_qwen3(directory: str, params: Mapping, model_cfg: model_config.ModelConfig, *,
                 tokenizer_dir: str | None = None, dtype: str = "bfloat16",
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 language_model_only: bool = False,
                 bos_token_id: int | None = None, eos_token_id: int | None = None) -> None:
  """Writes `params` (our layout, unrolled or scanned; any float dtype) as a HF
  Qwen3ForCausalLM directory.

  dtype: "bfloat16" (as released Qwen3 checkpoints; round to nearest even) or "float32".
  Writes config.json, model.safetensors (or shards + index when larger than
  max_shard_bytes) and copies tokenizer files from tokenizer_dir. A model with a vision
  tower raises ValueError unless language_model_only=True (then the vision tower is left
  out: ours is not Qwen3-VL's). Each file is written to a temporary name and renamed.
  """
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export_qwen3: dtype must be one of {tuple(EXPORT_DTYPES)}, got {dtype!r}")
  if model_cfg.vision is not None and not language_model_only:
    raise ValueError("export_qwen3: the model has a vision tower (ModelConfig.vision is set); "
                     "a Qwen3ForCausalLM checkpoint holds the language model only. Pass "
                     "language_model_only=True to export it without the vision tower.")
  specs = qwen3_tensor_specs(model_cfg)
  params = layer_stack.to_layout(params, scan_layers=False)  # HF numbers its layers
  named_arrays = []
  for spec in specs:
    array = _param_at(params, spec.param_path)
    ours = spec.hf_shape[::-1] if spec.transpose else spec.hf_shape
    if tuple(np.shape(array)) != tuple(ours):
      raise ValueError(f"export_qwen3: params {'/'.join(spec.param_path)} has shape "
                       f"{tuple(np.shape(array))}; model_cfg implies {tuple(ours)}")
    # Transposed lazily (a view), converted when its shard is written.
    named_arrays.append((spec.hf_name, _LazyTranspose(array) if spec.transpose else array))
  os.makedirs(directory, exist_ok=True)
  write_safetensors_shards(directory, named_arrays, dtype=EXPORT_DTYPES[dtype],
                           max_shard_bytes=max_shard_bytes)
  if tokenizer_dir is not None:
    copy_tokenizer_files(tokenizer_dir, directory)
  _atomic_write_json(hf_config_from_model(model_cfg, torch_dtype=dtype,
                                          bos_token_id=bos_token_id, eos_token_id=eos_token_id),
                     os.path.join(directory, CONFIG_FILE))


class _LazyTranspose:
  """array.T, fetched to host numpy only when written (keeps device arrays on device)."""

  def __init__(self, array):
    self._array = array
    self.shape = tuple(np.shape(array))[::-1]

  def __array__(self, dtype=None, copy=None):
    out = np.asarray(self._array).T
    return out if dtype is None else out.astype(dtype)
