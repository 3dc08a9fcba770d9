"""Qwen3-VL configuration parsed from a Hugging Face config.json, and vision-grid checks."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from copd_jax.models import hf_config, model_config

_VISION_ACTS = {"gelu_pytorch_tanh": True, "gelu": False}  # name -> tanh approximation?

# Sizes and ids in config.json are at most this (hf_config.MAX_CONFIG_INT).
MAX_CONFIG_INT = 2 ** 24
# The config.json fields each section may have besides transformers' bookkeeping
# (hf_config.HF_BOOKKEEPING_FIELDS); anything else is rejected, naming it.
TOP_FIELDS = ("text_config", "vision_config", "image_token_id", "video_token_id",
              "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings")
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
               "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
               "tie_word_embeddings", "attention_bias", "attention_dropout",
               "partial_rotary_factor", "image_token_id", "video_token_id",
               "vision_start_token_id", "vision_end_token_id")
TEXT_ROPE_FIELDS = ("rope_type", "type", "rope_theta", "mrope_section", "mrope_interleaved",
                    "partial_rotary_factor")
VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                 "num_position_embeddings", "deepstack_visual_indexes", "in_channels",
                 "patch_size", "temporal_patch_size", "spatial_merge_size", "hidden_act",
                 "rope_parameters", "layer_norm_eps")
VISION_ROPE_FIELDS = ("rope_type", "rope_theta")


# Layer and block counts are bounded by the safetensors headers instead
# (qwen3_vl_import.check_layer_counts), which name the count the files actually hold.
LAYER_COUNT_MAX = 2 ** 62


def config_int(owner: str, name: str, value, *, minimum: int = 1,
               maximum: int = MAX_CONFIG_INT) -> int:
  """A size or id from config.json: an integer in [minimum, maximum], else a ValueError
  naming owner.name."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
      not minimum <= value <= maximum:
    shown = value if not isinstance(value, int) or abs(value) < 10 ** 30 else \
        f"an integer of {len(str(abs(value)))} digits"
    raise ValueError(f"{owner}.{name} must be an integer in [{minimum}, {maximum}], "
                     f"got {shown!r}")
  return int(value)


def config_float(owner: str, name: str, value) -> float:
  """A positive finite number from config.json, else a ValueError naming owner.name."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or \
      not math.isfinite(value) or value <= 0:
    raise ValueError(f"{owner}.{name} must be a positive finite number, got {value!r}")
  return float(value)


def _check_fields(section: Mapping[str, Any], known, owner: str) -> None:
  hf_config.reject_unknown_fields(section, known, owner + "." if owner else "")


@dataclasses.dataclass(frozen=True)
class VisionTowerConfig:
  """Qwen3-VL vision tower sizes (HF `vision_config`)."""
  depth: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  out_hidden_size: int
  num_position_embeddings: int
  deepstack_visual_indexes: tuple[int, ...]
  in_channels: int = 3
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  hidden_act: str = "gelu_pytorch_tanh"
  rope_theta: float = 10000.0
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "deepstack_visual_indexes",
                       tuple(int(i) for i in self.deepstack_visual_indexes))
    self.validate()

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Values in one flattened patch: C * Tp * P * P (HF order: channel, time, row, col)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  @property
  def grid_per_side(self) -> int:
    return math.isqrt(self.num_position_embeddings)

  def validate(self) -> None:
    owner = "vision_config"
    for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                 "num_position_embeddings", "in_channels", "patch_size", "temporal_patch_size",
                 "spatial_merge_size"):
      model_config.require_positive_int(owner, name, getattr(self, name))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"{owner}.hidden_size={self.hidden_size} must be a multiple of "
                       f"num_heads={self.num_heads}")
    if self.head_dim % 4:
      raise ValueError(f"{owner}: head_dim = hidden_size / num_heads = {self.head_dim} must be a "
                       "multiple of 4 (2-D rotary: row and column halves of rotary pairs)")
    if self.grid_per_side ** 2 != self.num_position_embeddings:
      raise ValueError(f"{owner}.num_position_embeddings={self.num_position_embeddings} must be "
                       "a perfect square (a square grid of learned position embeddings)")
    if self.hidden_act not in _VISION_ACTS:
      raise ValueError(f"{owner}.hidden_act={self.hidden_act!r} is not supported; expected one "
                       f"of {sorted(_VISION_ACTS)}")
    bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
    if bad or len(set(self.deepstack_visual_indexes)) != len(self.deepstack_visual_indexes):
      raise ValueError(f"{owner}.deepstack_visual_indexes={list(self.deepstack_visual_indexes)} "
                       f"must be distinct block indexes in [0, depth={self.depth})")


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
  """A Qwen3-VL model: the text decoder (a copd_jax.models.model_config.ModelConfig without its toy vision
  encoder), the vision tower, the interleaved-MRoPE sections and the special token ids."""
  text: model_config.ModelConfig
  vision: VisionTowerConfig
  mrope_section: tuple[int, int, int]
  image_token_id: int
  video_token_id: int
  vision_start_token_id: int
  vision_end_token_id: int

  def __post_init__(self):
    object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
    self.validate()

  def validate(self) -> None:
    text, vision = self.text, self.vision
    if text.vision is not None:
      raise ValueError("Qwen3VLConfig.text must be a text-only ModelConfig (vision=None)")
    if len(self.mrope_section) != 3 or sum(self.mrope_section) != text.head_dim // 2:
      raise ValueError(f"text_config.rope_scaling.mrope_section={list(self.mrope_section)} must "
                       f"be three sizes summing to head_dim/2 = {text.head_dim // 2}")
    if vision.out_hidden_size != text.d_model:
      raise ValueError(f"vision_config.out_hidden_size={vision.out_hidden_size} must equal "
                       f"text_config.hidden_size={text.d_model}")
    if len(vision.deepstack_visual_indexes) > text.num_layers:
      raise ValueError(f"vision_config.deepstack_visual_indexes has "
                       f"{len(vision.deepstack_visual_indexes)} entries but the decoder has only "
                       f"{text.num_layers} layers to inject them into")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                 "vision_end_token_id"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
          0 <= value < text.vocab_size):
        raise ValueError(f"{name}={value!r} must be a token id in [0, vocab_size="
                         f"{text.vocab_size})")

  def with_execution_of(self, other: "Qwen3VLConfig") -> "Qwen3VLConfig":
    """This model with other's execution settings (remat, attention kernel), so two
    configs of one checkpoint compare equal however each computes."""
    return dataclasses.replace(self, text=model_config.with_execution_of(self.text, other.text))

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], *, dtype: str = "float32") -> "Qwen3VLConfig":
    """From a HF Qwen3-VL config.json dict (text_config + vision_config + token ids).

    Anything this implementation does not support raises ValueError naming the field.
    `dtype` is the compute dtype (parameters stay f32).
    """
    if not isinstance(config, Mapping):
      raise ValueError(f"Qwen3-VL config must be a JSON object, got {type(config).__name__}")
    hf_config.check_json_values(config, "config.json")  # finite, bounded, shallow
    model_type = config.get("model_type")
    if model_type not in (None, "qwen3_vl"):
      raise ValueError(f"config.model_type={model_type!r}: expected 'qwen3_vl'")
    for key in ("text_config", "vision_config"):
      if not isinstance(config.get(key), Mapping):
        raise ValueError(f"config.{key} is missing or not an object")
    text, vis = config["text_config"], config["vision_config"]
    _check_fields(config, TOP_FIELDS, "")
    _check_fields(text, TEXT_FIELDS, "text_config")
    _check_fields(vis, VISION_FIELDS, "vision_config")
    for key in ("rope_scaling", "rope_parameters"):
      if text.get(key) is not None and not isinstance(text[key], Mapping):
        raise ValueError(f"text_config.{key} must be an object or null, got {text[key]!r}")
      if isinstance(text.get(key), Mapping):
        _check_fields(text[key], TEXT_ROPE_FIELDS, f"text_config.{key}")
    if vis.get("rope_parameters") is not None:
      if not isinstance(vis["rope_parameters"], Mapping):
        raise ValueError("vision_config.rope_parameters must be an object or null")
      _check_fields(vis["rope_parameters"], VISION_ROPE_FIELDS, "vision_config.rope_parameters")
    hf_config.check_partial_rotary(text, "text_config.")
    if text.get("attention_dropout", 0.0) not in (0, 0.0):
      raise ValueError(f"text_config.attention_dropout={text['attention_dropout']!r} is not "
                       "implemented (only 0.0)")
    text_cfg = _text_config_from_hf(text, config, dtype)
    vision_cfg = _vision_config_from_hf(vis)
    mrope = _rope_parameters(text).get("mrope_section")
    if mrope is None:
      raise ValueError("text_config.rope_scaling.mrope_section (or rope_parameters."
                       "mrope_section) is missing")
    if not isinstance(mrope, list) or len(mrope) != 3:
      raise ValueError(f"text_config.rope_parameters.mrope_section must be a list of three "
                       f"integers, got {mrope!r}")
    mrope = [config_int("text_config.rope_parameters", "mrope_section", m, minimum=0)
             for m in mrope]
    token_ids = {}
    for name, default in (("image_token_id", None), ("video_token_id", None),
                          ("vision_start_token_id", None), ("vision_end_token_id", None)):
      value = config.get(name, text.get(name, default))
      if value is None:
        raise ValueError(f"config.{name} is missing")
      token_ids[name] = config_int("config", name, value, minimum=0)
    return cls(text=text_cfg, vision=vision_cfg, mrope_section=tuple(mrope), **token_ids)


def _rope_parameters(text: Mapping[str, Any]) -> dict:
  """transformers >= 5 writes `rope_parameters`; 4.x wrote `rope_theta` + `rope_scaling`."""
  params = dict(text.get("rope_scaling") or {})
  params.update(text.get("rope_parameters") or {})
  if "rope_theta" not in params and "rope_theta" in text:
    params["rope_theta"] = text["rope_theta"]
  return params


def _text_config_from_hf(text: Mapping[str, Any], top: Mapping[str, Any],
                         dtype: str) -> model_config.ModelConfig:
  def need(name):
    if name not in text:
      raise ValueError(f"text_config.{name} is missing")
    return text[name]
  if text.get("hidden_act", "silu") != "silu":
    raise ValueError(f"text_config.hidden_act={text['hidden_act']!r} is not supported "
                     "(only 'silu')")
  if text.get("attention_bias", False):
    raise ValueError("text_config.attention_bias=True is not supported (Qwen3 has no "
                     "attention biases)")
  rope = _rope_parameters(text)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"text_config.rope_parameters.rope_type={rope_type!r} is not supported "
                     "(only 'default')")
  if rope.get("mrope_interleaved", True) is not True:
    raise ValueError("text_config.rope_scaling.mrope_interleaved=False is not supported "
                     "(Qwen3-VL interleaves t/h/w frequencies)")
  if "rope_theta" not in rope:
    raise ValueError("text_config.rope_theta (or rope_parameters.rope_theta) is missing")
  size = lambda name, top=MAX_CONFIG_INT: config_int(  # noqa: E731
      "text_config", name, need(name), maximum=top)
  heads = size("num_attention_heads")
  head_dim = (config_int("text_config", "head_dim", text["head_dim"])
              if text.get("head_dim") is not None else size("hidden_size") // heads)
  kv_heads = (config_int("text_config", "num_key_value_heads", text["num_key_value_heads"])
              if text.get("num_key_value_heads") is not None else heads)
  tie = top.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
  if not isinstance(tie, bool):
    raise ValueError(f"tie_word_embeddings must be true or false, got {tie!r}")
  return model_config.ModelConfig(
      vocab_size=size("vocab_size"), d_model=size("hidden_size"),
      num_layers=size("num_hidden_layers", LAYER_COUNT_MAX), num_heads=heads,
      num_kv_heads=kv_heads, head_dim=head_dim,
      mlp_dim=size("intermediate_size"),
      rope_theta=config_float("text_config", "rope_theta", rope["rope_theta"]),
      rms_norm_eps=config_float("text_config", "rms_norm_eps", text.get("rms_norm_eps", 1e-6)),
      tie_embeddings=tie, dtype=dtype)


def _vision_config_from_hf(vis: Mapping[str, Any]) -> VisionTowerConfig:
  fields = {}
  for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
               "num_position_embeddings", "deepstack_visual_indexes"):
    if name not in vis:
      raise ValueError(f"vision_config.{name} is missing")
    fields[name] = vis[name]
  for name in ("in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size",
               "hidden_act"):
    if name in vis:
      fields[name] = vis[name]
  for name in ("patch_size", "temporal_patch_size"):
    if isinstance(fields.get(name), (list, tuple)):
      raise ValueError(f"vision_config.{name}={fields[name]!r}: only a single int is supported")
  for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
               "num_position_embeddings", "in_channels", "patch_size", "temporal_patch_size",
               "spatial_merge_size"):
    if name in fields:
      fields[name] = config_int("vision_config", name, fields[name],
                                maximum=LAYER_COUNT_MAX if name == "depth" else MAX_CONFIG_INT)
  indexes = fields["deepstack_visual_indexes"]
  if not isinstance(indexes, list):
    raise ValueError(f"vision_config.deepstack_visual_indexes must be a list of block "
                     f"indexes, got {indexes!r}")
  fields["deepstack_visual_indexes"] = [
      config_int("vision_config", "deepstack_visual_indexes", i, minimum=0) for i in indexes]
  rope = dict(vis.get("rope_parameters") or {})
  if rope.get("rope_type", "axial") != "axial":
    raise ValueError(f"vision_config.rope_parameters.rope_type={rope['rope_type']!r} is not "
                     "supported (only 'axial')")
  if "rope_theta" in rope:
    fields["rope_theta"] = config_float("vision_config.rope_parameters", "rope_theta",
                                        rope["rope_theta"])
  if "layer_norm_eps" in vis:
    fields["layer_norm_eps"] = config_float("vision_config", "layer_norm_eps",
                                            vis["layer_norm_eps"])
  return VisionTowerConfig(**fields)


Grid = tuple[int, int, int]


def grids_to_tuple(grid_thw, what: str) -> tuple[Grid, ...]:
  """int[N, 3] (numpy, list or None) -> a hashable tuple of (t, h, w), validated."""
  if grid_thw is None:
    return ()
  arr = np.asarray(grid_thw)
  if arr.ndim != 2 or arr.shape[1] != 3 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{what} must be int[N, 3] (t, h, w per item), got {arr.dtype}{arr.shape}")
  if (arr <= 0).any():
    raise ValueError(f"{what} must be positive, got {arr.tolist()}")
  return tuple(tuple(int(v) for v in row) for row in arr)


def _check_grids(grids: tuple[Grid, ...], vcfg: VisionTowerConfig, what: str) -> None:
  m = vcfg.spatial_merge_size
  for i, (_, h, w) in enumerate(grids):
    if h % m or w % m:
      raise ValueError(f"{what}[{i}] = {grids[i]}: h and w must be multiples of "
                       f"spatial_merge_size={m}")
