"""config.json of a Hugging Face checkpoint: reading it (and a safetensors index) with
every failure a HFCheckpointError naming the file and field, the checks importers share
(unknown fields, partial rotary, finite bounded JSON values), and Qwen3's config.json <->
ModelConfig.

    cfg = model_config_from_hf(read_hf_config(directory), dtype="bfloat16")
    hf_config_from_model(cfg)   # the config.json dict export_qwen3 writes
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

from copd_jax.models import model_config

CONFIG_FILE = "config.json"


class HFCheckpointError(ValueError):
  """A Hugging Face checkpoint directory cannot be read as the model it claims to be."""


# Sizes read from config.json (dimensions, counts, token ids) are at most this: a model
# dimension beyond 2**24 is a corrupt or hostile file, not a model.
MAX_CONFIG_INT = 2 ** 24
# JSON nesting a config.json / index file may have (real ones have 3 levels).
MAX_JSON_DEPTH = 32

# Fields of transformers' PretrainedConfig that never change the forward pass (names,
# versions, cache and output switches, generation defaults older versions wrote into
# config.json). Every other field must be one an importer implements, or it is an error.
HF_BOOKKEEPING_FIELDS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
    "model_type", "use_cache", "initializer_range", "pad_token_id", "bos_token_id",
    "eos_token_id", "sep_token_id", "decoder_start_token_id", "max_position_embeddings",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "id2label", "label2id", "problem_type",
    "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens"})


def reject_unknown_fields(section: Mapping, implemented: Iterable[str], where: str) -> None:
  """Raises HFCheckpointError naming the first field of `section` that is neither
  implemented nor bookkeeping (HF_BOOKKEEPING_FIELDS): a setting we would silently
  ignore would compute another model than the checkpoint's."""
  known = set(implemented) | HF_BOOKKEEPING_FIELDS
  unknown = sorted(k for k in section if k not in known)
  if unknown:
    raise HFCheckpointError(
        f"config.json: {where}{unknown[0]!r} is not implemented by this importer (unknown "
        f"field(s) {unknown[:8]}); a checkpoint that needs it would be computed wrongly")


def check_partial_rotary(section: Mapping, where: str) -> None:
  """partial_rotary_factor (top level or inside rope_parameters) must be absent or 1.0:
  our rotary embedding rotates every head dimension."""
  for node, prefix in ((section, where), (section.get("rope_parameters") or {},
                                          f"{where}rope_parameters."),
                       (section.get("rope_scaling") or {}, f"{where}rope_scaling.")):
    if isinstance(node, Mapping) and "partial_rotary_factor" in node and \
        node["partial_rotary_factor"] != 1.0:
      raise HFCheckpointError(
          f"config.json: {prefix}partial_rotary_factor is {node['partial_rotary_factor']!r}; "
          "only full rotary embeddings (1.0) are implemented")


def _hf_int(config: Mapping, field: str, default=None, maximum: int = MAX_CONFIG_INT) -> int:
  """A positive integer field of config.json, at most `maximum` (layer counts are bounded
  by the safetensors headers instead: check_layers_present)."""
  value = config.get(field, default)
  if value is None:
    raise HFCheckpointError(f"config.json: required field {field!r} is missing")
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise HFCheckpointError(f"config.json: {field!r} must be a positive integer, got {value!r}")
  if value > maximum:
    raise HFCheckpointError(f"config.json: {field!r} is {value}, more than {maximum} "
                            "(not a model size)")
  return value


def _hf_positive_float(config: Mapping, field: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
      not math.isfinite(value):
    raise HFCheckpointError(f"config.json: {field!r} must be a positive finite number, got "
                            f"{value!r}")
  return float(value)


def check_json_values(value: Any, where: str, path: str = "", depth: int = 0) -> None:
  """Every float in a parsed JSON value is finite, every integer fits in 64 bits, and
  nesting is at most MAX_JSON_DEPTH; errors name `where` and the dotted path."""
  if depth > MAX_JSON_DEPTH:
    raise HFCheckpointError(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep at "
                            f"{path or 'the top'}")
  if isinstance(value, Mapping):
    for key, item in value.items():
      check_json_values(item, where, f"{path}.{key}" if path else str(key), depth + 1)
  elif isinstance(value, list):
    for i, item in enumerate(value):
      check_json_values(item, where, f"{path}[{i}]", depth + 1)
  elif isinstance(value, float) and not math.isfinite(value):
    raise HFCheckpointError(f"{where}: {path} is {value}; every number must be finite")
  elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2 ** 63:
    raise HFCheckpointError(f"{where}: {path} is an integer of {len(str(abs(value)))} digits "
                            "(more than 64 bits)")


def load_json_file(path: str) -> Any:
  """json.load with every failure a HFCheckpointError naming the file: bad JSON,
  non-UTF-8 bytes, deep nesting, integers too long to parse; then check_json_values."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except json.JSONDecodeError as err:
    raise HFCheckpointError(f"{path}: not valid JSON ({err})") from None
  except UnicodeDecodeError as err:
    raise HFCheckpointError(f"{path}: not UTF-8 (byte offset {err.start})") from None
  except RecursionError:
    raise HFCheckpointError(f"{path}: JSON nested too deeply") from None
  except ValueError as err:  # e.g. an integer of more than 4300 digits
    raise HFCheckpointError(f"{path}: unreadable JSON value ({err})") from None
  check_json_values(value, path)
  return value


def _rope_theta(config: Mapping) -> float:
  """rope_theta from either layout: transformers < 5 (`rope_theta` + `rope_scaling`) or
  >= 5 (`rope_parameters` = {"rope_type", "rope_theta"}). Only plain RoPE is supported."""
  for field in ("rope_scaling", "rope_parameters"):
    rope = config.get(field)
    if rope is None:
      continue
    if not isinstance(rope, Mapping):
      raise HFCheckpointError(f"config.json: {field!r} must be an object or null, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
      raise HFCheckpointError(f"config.json: {field!r} has rope_type {kind!r}; only plain "
                              "RoPE ('default' or null) is supported")
  params = config.get("rope_parameters") or {}
  theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
  return _hf_positive_float(config, "rope_theta", theta)


# The Qwen3 text config fields load_qwen3 reads or checks (besides bookkeeping).
QWEN3_TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias",
    "attention_dropout", "use_sliding_window", "sliding_window", "max_window_layers",
    "layer_types", "num_experts", "num_experts_per_tok", "quantization_config",
    "partial_rotary_factor")
# Keys of rope_scaling / rope_parameters we implement (plain RoPE).
ROPE_FIELDS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def _reject_unsupported(config: Mapping) -> None:
  """Raises HFCheckpointError naming the first config.json field we cannot honour."""
  model_type = config.get("model_type")
  if model_type != "qwen3":
    raise HFCheckpointError(f"config.json: 'model_type' is {model_type!r}; load_qwen3 reads "
                            "Qwen3 text models ('qwen3') only")
  reject_unknown_fields(config, QWEN3_TEXT_FIELDS, "")
  for field in ("rope_scaling", "rope_parameters"):
    if isinstance(config.get(field), Mapping):
      reject_unknown_fields(config[field], ROPE_FIELDS, f"{field}.")
  check_partial_rotary(config, "")
  if config.get("attention_dropout", 0.0) not in (0, 0.0):
    raise HFCheckpointError(f"config.json: 'attention_dropout' is "
                            f"{config['attention_dropout']!r}; attention dropout is not "
                            "implemented (only 0.0)")
  if config.get("hidden_act", "silu") != "silu":
    raise HFCheckpointError(f"config.json: 'hidden_act' is {config['hidden_act']!r}; only "
                            "'silu' (SwiGLU) is supported")
  if config.get("attention_bias", False):
    raise HFCheckpointError("config.json: 'attention_bias' is true; our attention has no "
                            "q/k/v/o biases")
  if config.get("use_sliding_window", False):
    raise HFCheckpointError("config.json: 'use_sliding_window' is true; only full attention "
                            "is supported")
  layer_types = config.get("layer_types")
  if layer_types is not None and any(t != "full_attention" for t in layer_types):
    raise HFCheckpointError(f"config.json: 'layer_types' has {sorted(set(layer_types))}; only "
                            "'full_attention' layers are supported")
  for field in ("num_experts", "num_experts_per_tok"):
    if config.get(field):
      raise HFCheckpointError(f"config.json: {field!r} = {config[field]!r}; mixture-of-experts "
                              "layers are not supported")
  if config.get("quantization_config") is not None:
    raise HFCheckpointError("config.json: 'quantization_config' is set; only unquantized "
                            "float checkpoints are supported")


def model_config_from_hf(config: Mapping, *, dtype: str = "float32") -> model_config.ModelConfig:
  """A Qwen3ForCausalLM config.json (as a dict) -> ModelConfig (text only, no vision).

  dtype: our compute dtype ("float32" or "bfloat16"); parameters are f32 either way.
  Unsupported features (non-default rope scaling, sliding window, attention bias, MoE,
  quantization, another architecture) raise HFCheckpointError naming the config.json field.
  """
  if not isinstance(config, Mapping):
    raise HFCheckpointError(f"config.json must hold a JSON object, got {type(config).__name__}")
  _reject_unsupported(config)
  num_heads = _hf_int(config, "num_attention_heads")
  d_model = _hf_int(config, "hidden_size")
  head_dim = config.get("head_dim")
  if head_dim is None:  # HF's default when the field is absent
    if d_model % num_heads:
      raise HFCheckpointError(f"config.json: 'head_dim' is missing and hidden_size={d_model} "
                              f"is not a multiple of num_attention_heads={num_heads}")
    head_dim = d_model // num_heads
  tie = config.get("tie_word_embeddings", False)  # Qwen3Config's default
  if not isinstance(tie, bool):
    raise HFCheckpointError(f"config.json: 'tie_word_embeddings' must be a bool, got {tie!r}")
  fields = dict(
      vocab_size=_hf_int(config, "vocab_size"),
      d_model=d_model,
      num_layers=_hf_int(config, "num_hidden_layers", maximum=2 ** 62),  # headers bound it
      num_heads=num_heads,
      num_kv_heads=_hf_int(config, "num_key_value_heads", num_heads),
      head_dim=_hf_int({"head_dim": head_dim}, "head_dim"),
      mlp_dim=_hf_int(config, "intermediate_size"),
      rope_theta=_rope_theta(config),
      rms_norm_eps=_hf_positive_float(config, "rms_norm_eps", config.get("rms_norm_eps", 1e-6)),
      tie_embeddings=tie,
      dtype=dtype,
  )
  try:
    return model_config.ModelConfig(**fields)
  except ValueError as err:  # e.g. heads not a multiple of kv heads
    raise HFCheckpointError(f"config.json: {err}") from err


def hf_config_from_model(cfg: model_config.ModelConfig, *, torch_dtype: str = "bfloat16",
                         bos_token_id: int | None = None,
                         eos_token_id: int | None = None,
                         max_position_embeddings: int = 40960) -> dict:
  """ModelConfig -> a Qwen3ForCausalLM config.json dict that transformers 4.51+ and 5.x load.

  Both rope layouts are written (`rope_theta`/`rope_scaling` and `rope_parameters`).
  """
  return {
      "architectures": ["Qwen3ForCausalLM"],
      "model_type": "qwen3",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": bool(cfg.tie_embeddings),
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": cfg.num_layers,
      "layer_types": ["full_attention"] * cfg.num_layers,
      "max_position_embeddings": max_position_embeddings,
      "initializer_range": 0.02,
      "use_cache": True,
      "bos_token_id": bos_token_id,
      "eos_token_id": eos_token_id,
      "torch_dtype": torch_dtype,
      "dtype": torch_dtype,
  }


def read_hf_config(directory: str) -> dict:
  """config.json as a dict; unreadable JSON, non-finite numbers, integers beyond 64 bits
  and deep nesting are HFCheckpointError naming the file (and the field)."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no config.json in the checkpoint directory")
  return load_json_file(path)
