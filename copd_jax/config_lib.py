"""Checks a run's ml_collections config before anything is built or compiled.

Every error names the offending field (`config.warm_start.batch_size ...`), so a typo
on the command line fails in a second rather than deep inside a jitted function.
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping

import ml_collections

from copd_jax import default_config, schedules, tasks

KNOWN_METHODS = default_config.METHODS
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
  if cfg.method in ("base", "mixed_rlvr") and cfg.num_experts != 1:
    _fail("num_experts", f"must be 1 for method {cfg.method!r} (one policy)", cfg.num_experts)
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
  _positive_int(ws, "seed", "warm_start.", allow_zero=True)
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
  if cfg.method != "base":
    if "rl" not in cfg:
      _fail("rl", f"section is required for method {cfg.method!r}", None)
    validate_rl(cfg)


def _wrap(field: str, build):
  """Builds a library object from a config node, renaming its errors to the field."""
  try:
    return build()
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.{field}: {e}") from None


def validate_rl(cfg: ml_collections.ConfigDict) -> None:
  """Checks config.rl for the RL methods (experts, mixed_rlvr, static_opd, mopd, copd)."""
  from copd_jax import kernels, objectives  # jax-importing; only needed for RL methods
  rl = cfg.rl
  caps = tuple(rl.capabilities)
  if not caps or len(set(caps)) != len(caps):
    _fail("rl.capabilities", "must name distinct capabilities", caps)
  for cap in caps:
    if cap not in cfg.tasks.capabilities:
      _fail("rl.capabilities", f"has {cap!r}, which is not in config.tasks.capabilities "
            f"{tuple(cfg.tasks.capabilities)} (the base never saw it)", caps)
  if cfg.method not in ("mixed_rlvr",) and cfg.num_experts != len(caps):
    _fail("num_experts", f"must equal the number of rl.capabilities ({len(caps)}) for method "
          f"{cfg.method!r}: one expert branch per capability", cfg.num_experts)
  if cfg.method in ("copd", "static_opd") and len(caps) < 2:
    _fail("rl.capabilities", f"method {cfg.method!r} needs at least two capabilities", caps)
  for f in ("steps", "native_prompts", "samples_per_prompt", "eval_every", "eval_examples",
            "diagnostic_prompts", "diagnostics_every", "log_every"):
    _positive_int(rl, f, "rl.")
  _positive_int(rl, "cross_prompts", "rl.", allow_zero=True)
  _positive_int(rl, "distill_steps", "rl.", allow_zero=True)
  _positive_float(rl, "learning_rate", "rl.")
  _positive_float(rl, "grad_clip_norm", "rl.")
  _positive_float(rl, "weight_decay", "rl.", allow_zero=True)
  if cfg.method == "copd" and rl.cross_prompts == 0 and rl.opd.topology != "none":
    _fail("rl.cross_prompts", "must be positive for CoPD with a teacher topology", 0)
  _wrap("rl.loss", lambda: objectives.PolicyLossConfig(**rl.loss.to_dict()))
  _wrap("rl.kernel", lambda: kernels.KernelConfig(**rl.kernel.to_dict()))
  opd = rl.opd
  if opd.topology not in ("hub", "full", "none"):
    _fail("rl.opd.topology", "must be one of ('hub', 'full', 'none')", opd.topology)
  if opd.topology == "hub" and opd.hub not in caps:
    _fail("rl.opd.hub", f"must be one of rl.capabilities {caps}", opd.hub)
  _positive_float(opd, "beta", "rl.opd.", allow_zero=True)
  _check_capability_dict(opd.branch_beta, "rl.opd.branch_beta", caps)
  for cap in opd.branch_beta:
    _positive_float(opd.branch_beta, cap, "rl.opd.branch_beta.", allow_zero=True)
  _wrap("rl.opd.schedule", lambda: schedules.OPDSchedule(**opd.schedule.to_dict()))
  _check_capability_dict(rl.merge_weights, "rl.merge_weights", caps)
  if rl.merge_weights and set(rl.merge_weights) != set(caps):
    _fail("rl.merge_weights", f"must give a weight to every branch {caps} (or be empty "
          "for a uniform merge)", dict(rl.merge_weights))
  if cfg.method in ("mopd", "static_opd") and not rl.opd.beta > 0:
    _fail("rl.opd.beta", f"must be positive for method {cfg.method!r} (it only adds "
          "distillation to the experts)", rl.opd.beta)
  for cap in rl.merge_weights:
    _positive_float(rl.merge_weights, cap, "rl.merge_weights.", allow_zero=True)
  if rl.merge_weights and sum(rl.merge_weights.values()) <= 0:
    _fail("rl.merge_weights", "must give some branch a positive weight", dict(rl.merge_weights))
  if cfg.method == "static_opd":
    t, s = rl.static_opd.teacher, rl.static_opd.student
    for name, cap in (("teacher", t), ("student", s)):
      if cap not in caps:
        _fail(f"rl.static_opd.{name}", f"must be one of rl.capabilities {caps}", cap)
    if t == s:
      _fail("rl.static_opd.student", "must differ from rl.static_opd.teacher", s)
