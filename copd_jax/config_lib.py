"""Checks a run's ml_collections config before anything is built or compiled.

Every error names the offending field (`config.warm_start.batch_size ...`), so a typo
on the command line fails in a second rather than deep inside a jitted function.
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping

import ml_collections

from copd_jax import tasks

# Methods the main job can run. The trainer issue adds the RL methods to this tuple.
KNOWN_METHODS = ("base",)
COMPUTE_DTYPES = ("float32", "bfloat16")


def _fail(field: str, message: str, value: Any) -> None:
  raise ValueError(f"config.{field} {message}, got {value!r}")


def _positive_int(cfg: Mapping[str, Any], field: str, prefix: str, allow_zero=False) -> int:
  value = cfg[field]
  ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if not ok or value < 0 or (value == 0 and not allow_zero):
    _fail(f"{prefix}{field}", "must be a " + ("non-negative" if allow_zero else "positive")
          + " integer", value)
  return int(value)


def _positive_float(cfg, field: str, prefix: str, allow_zero=False) -> float:
  value = cfg[field]
  if not isinstance(value, numbers.Real) or isinstance(value, bool) or value != value:
    _fail(f"{prefix}{field}", "must be a number", value)
  if value < 0 or (value == 0 and not allow_zero):
    _fail(f"{prefix}{field}", "must be " + ("non-negative" if allow_zero else "positive"), value)
  return float(value)


def _check_capability_dict(d, field: str, capabilities) -> None:
  unknown = set(d) - set(capabilities)
  if unknown:
    _fail(field, f"names capabilities not in config.tasks.capabilities {tuple(capabilities)}",
          sorted(unknown))


def validate_model(m, prefix="model.") -> None:
  for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "mlp_dim"):
    _positive_int(m, f, prefix)
  if m.num_heads % m.num_kv_heads:
    _fail(f"{prefix}num_heads", f"must be a multiple of num_kv_heads={m.num_kv_heads}",
          m.num_heads)
  if m.head_dim % 2:
    _fail(f"{prefix}head_dim", "must be even (rotary embeddings rotate pairs)", m.head_dim)
  if m.dtype not in COMPUTE_DTYPES:
    _fail(f"{prefix}dtype", f"must be one of {COMPUTE_DTYPES}", m.dtype)
  _positive_float(m, "rope_theta", prefix)
  v = m.vision
  for f in ("image_size", "patch_size", "channels", "num_frames", "tubelet", "width", "depth",
            "num_heads", "mlp_dim"):
    _positive_int(v, f, f"{prefix}vision.")
  if v.image_size % v.patch_size:
    _fail(f"{prefix}vision.image_size", f"must be a multiple of patch_size={v.patch_size}",
          v.image_size)
  if v.num_frames % v.tubelet:
    _fail(f"{prefix}vision.num_frames", f"must be a multiple of tubelet={v.tubelet}",
          v.num_frames)
  if v.width % v.num_heads:
    _fail(f"{prefix}vision.width", f"must be a multiple of num_heads={v.num_heads}", v.width)
  if not 0 <= m.image_token_id < m.vocab_size:
    _fail(f"{prefix}image_token_id", f"must index the vocabulary (size {m.vocab_size})",
          m.image_token_id)


def _check_lengths_fit_tasks(cfg, caps) -> None:
  """The generators' longest prompt/solution at these difficulties must fit the arrays."""
  v = cfg.model.vision
  num_vision_tokens = (v.num_frames // v.tubelet) * (v.image_size // v.patch_size) ** 2
  need_prompt, need_response = tasks.max_lengths(
      caps, difficulty=dict(cfg.tasks.difficulty), num_vision_tokens=num_vision_tokens,
      image_size=v.image_size, num_frames=v.num_frames)
  if cfg.data.max_prompt_len < need_prompt:
    _fail("data.max_prompt_len", f"must be >= {need_prompt} (longest prompt of these tasks "
          "at these difficulties, vision tokens included)", cfg.data.max_prompt_len)
  if cfg.data.max_response_len < need_response:
    _fail("data.max_response_len", f"must be >= {need_response} (longest worked solution "
          "plus <eos> at these difficulties)", cfg.data.max_response_len)


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field of a run config."""
  if cfg.method not in KNOWN_METHODS:
    _fail("method", f"must be one of {KNOWN_METHODS}", cfg.method)
  _positive_int(cfg, "num_experts", "")
  if cfg.method == "base" and cfg.num_experts != 1:
    _fail("num_experts", "must be 1 for method 'base' (one shared base policy)", cfg.num_experts)
  if not isinstance(cfg.seed, numbers.Integral):
    _fail("seed", "must be an integer", cfg.seed)

  validate_model(cfg.model)

  caps = tuple(cfg.tasks.capabilities)
  if not caps:
    _fail("tasks.capabilities", "must name at least one capability", caps)
  for cap in caps:
    if cap not in tasks.CAPABILITIES:
      _fail("tasks.capabilities", f"has unknown task {cap!r}; known: {tasks.CAPABILITIES}", caps)
  if len(set(caps)) != len(caps):
    _fail("tasks.capabilities", "must not repeat a capability", caps)
  _check_capability_dict(cfg.tasks.difficulty, "tasks.difficulty", caps)
  for cap in caps:
    if cap not in cfg.tasks.difficulty:
      _fail("tasks.difficulty", f"needs an entry for {cap!r}", dict(cfg.tasks.difficulty))
    _positive_int(cfg.tasks.difficulty, cap, "tasks.difficulty.", allow_zero=True)

  _positive_int(cfg.data, "max_prompt_len", "data.")
  _positive_int(cfg.data, "max_response_len", "data.")
  _check_lengths_fit_tasks(cfg, caps)

  ws = cfg.warm_start
  _positive_int(ws, "steps", "warm_start.", allow_zero=True)
  _positive_int(ws, "batch_size", "warm_start.")
  _positive_int(ws, "warmup_steps", "warm_start.", allow_zero=True)
  _positive_int(ws, "log_every", "warm_start.")
  _positive_float(ws, "learning_rate", "warm_start.")
  _positive_float(ws, "weight_decay", "warm_start.", allow_zero=True)
  _positive_float(ws, "grad_clip_norm", "warm_start.")
  _check_capability_dict(ws.mix, "warm_start.mix", caps)
  for cap, w in ws.mix.items():
    _positive_float(ws.mix, cap, "warm_start.mix.", allow_zero=True)
  if sum(ws.mix.values()) <= 0:
    _fail("warm_start.mix", "must give some capability a positive weight", dict(ws.mix))

  _positive_int(cfg.eval, "num_examples", "eval.")
  _positive_int(cfg.eval, "batch_size", "eval.")

  s = cfg.sampling
  _positive_float(s, "temperature", "sampling.")
  _positive_int(s, "top_k", "sampling.", allow_zero=True)
  top_p = _positive_float(s, "top_p", "sampling.")
  if top_p > 1:
    _fail("sampling.top_p", "must be in (0, 1]", top_p)
  _positive_int(s, "max_new_tokens", "sampling.")
  if s.max_new_tokens > cfg.data.max_response_len:
    _fail("sampling.max_new_tokens", f"must not exceed data.max_response_len="
          f"{cfg.data.max_response_len}", s.max_new_tokens)
