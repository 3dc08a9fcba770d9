"""How a run-spec field is declared and checked (copd_jax/run_spec.py).

* `doc(meaning, default)`: a dataclass field with its one-line meaning. `--help` and the
  error messages read the meanings from the dataclasses (run_spec.field_docs); there is no
  second table of field meanings.
* `check_int`, `check_float`, ...: value checks whose ValueError names the config field
  (`config.rl.steps must be a positive integer, got 0`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

DOC = "doc"  # field metadata: the field's one-line meaning
SUBFIELDS = "fields"  # field metadata: {dotted subfield: meaning} of a library-type section
CONFIG_KEY = "config_key"  # field metadata: its dotted config name, where that differs


def doc(meaning: str, default: Any = dataclasses.MISSING, *, factory=dataclasses.MISSING,
        fields: Mapping[str, str] | None = None, config_key: str = ""):
  """A dataclass field documented by `meaning` (no default: a required field).

  factory: a default_factory instead of a default. fields: for a section whose type is a
  library dataclass (models.ModelConfig, losses.PolicyLossConfig, ...), the meanings of its
  own fields as this config uses them, by dotted name ('vision.width'). config_key: the
  field's dotted config name when it is not the field's path (spec.lora is config.model.lora).
  """
  if not isinstance(meaning, str) or not meaning.strip():
    raise ValueError("a run-spec field needs a one-line meaning")
  metadata = {DOC: meaning}
  if fields:
    metadata[SUBFIELDS] = dict(fields)
  if config_key:
    metadata[CONFIG_KEY] = config_key
  return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def section(cls, meaning: str):
  """A section field: a `cls` built from its own defaults unless given."""
  return doc(meaning, factory=cls)


def dict_field(meaning: str):
  """A mapping field, {} unless given."""
  return doc(meaning, factory=dict)


# ------------------------------------------------ checks (errors name the config field)


def fail(field: str, message: str, value: Any) -> None:
  raise ValueError(f"config.{field} {message}, got {value!r}")


def check_int(field: str, value, allow_zero: bool = False) -> int:
  """value as an int, or a ValueError naming config.<field> unless a positive (or, with
  allow_zero, non-negative) integer."""
  ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if not ok or value < 0 or (value == 0 and not allow_zero):
    fail(field, "must be a " + ("non-negative" if allow_zero else "positive") + " integer", value)
  return int(value)


def check_float(field: str, value, allow_zero: bool = False) -> float:
  """value as a float, or a ValueError naming config.<field> unless a finite positive (or,
  with allow_zero, non-negative) number."""
  if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
    fail(field, "must be a finite number", value)
  if value < 0 or (value == 0 and not allow_zero):
    fail(field, "must be " + ("non-negative" if allow_zero else "positive"), value)
  return float(value)


def check_fraction(field: str, value) -> float:
  if check_float(field, value, allow_zero=True) > 1:
    fail(field, "must be a fraction in [0, 1]", value)
  return float(value)


def check_bools(section_name: str, spec, names) -> None:
  for name in names:
    if not isinstance(getattr(spec, name), bool):
      fail(f"{section_name}.{name}", "must be True or False", getattr(spec, name))


def check_weights(field: str, weights: Mapping[str, Any], *, fraction: bool = False) -> None:
  """Every value of a {capability: number} mapping non-negative (fraction: in [0, 1])."""
  for key, value in weights.items():
    if fraction:
      check_fraction(f"{field}.{key}", value)
    else:
      check_float(f"{field}.{key}", value, allow_zero=True)


# ------------------------------------- checks across a RunSpec's sections (its __post_init__)


def check_rl_sampling(sampling) -> None:
  """RL stages sample at temperature 1 over the full vocabulary: the loss, the old
  log-probs and the teachers all score that distribution, so any other sampling
  distribution would bias the gradient and make the OPD log-ratio measure another policy.
  Other values are rejected rather than silently mis-trained."""
  if sampling.temperature != 1.0:
    fail("sampling.temperature", "must be 1.0 for RL methods (the policy loss, old "
         "log-probs and teachers score at temperature 1; eval.pass_temperature sets the "
         "evaluation's)", sampling.temperature)
  if sampling.top_k != 0:
    fail("sampling.top_k", "must be 0 (full vocabulary) for RL methods (the policy loss and "
         "teachers score the untruncated distribution)", sampling.top_k)
  if sampling.top_p != 1.0:
    fail("sampling.top_p", "must be 1.0 (no nucleus truncation) for RL methods (the policy "
         "loss and teachers score the untruncated distribution)", sampling.top_p)


def _check_known(field: str, names, capabilities) -> None:
  unknown = set(names) - set(capabilities)
  if unknown:
    fail(field, f"names capabilities not in rl.capabilities {tuple(capabilities)}",
         sorted(unknown))


def check_rl_methods(spec) -> None:
  """The RL methods' settings across a run_spec.RunSpec's sections (RLSpec and OPDSpec
  check their own)."""
  from copd_jax import losses
  rl, method = spec.rl, spec.method
  check_rl_sampling(spec.sampling)
  caps = tuple(rl.capabilities)
  for cap in caps:
    if cap not in spec.tasks.capabilities:
      fail("rl.capabilities", f"has {cap!r}, which is not in config.tasks.capabilities "
           f"{tuple(spec.tasks.capabilities)} (the base never saw it)", caps)
  if method != "mixed_rlvr" and spec.num_experts != len(caps):
    fail("num_experts", f"must equal the number of rl.capabilities ({len(caps)}) for method "
         f"{method!r}: one expert branch per capability", spec.num_experts)
  if method in ("copd", "static_opd") and len(caps) < 2:
    fail("rl.capabilities", f"method {method!r} needs at least two capabilities", caps)
  opd = rl.opd
  if method == "copd" and rl.cross_prompts == 0 and opd.topology != "none":
    fail("rl.cross_prompts", "must be positive for CoPD with a teacher topology", 0)
  if opd.topology == "hub" and opd.hub not in caps:
    fail("rl.opd.hub", f"must be one of rl.capabilities {caps}", opd.hub)
  _check_known("rl.opd.branch_beta", opd.branch_beta, caps)
  try:  # vocab None: a checkpoint's, unknown here
    losses.check_opd_estimator(
        opd.estimator, opd.top_k, rl.kernel.backend,
        None if spec.init.hf_checkpoint else spec.model.vocab_size,
        one_device=spec.pod is None and all(int(v) == 1 for v in spec.mesh.sizes().values()))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.rl.opd: {e}") from None
  _check_known("rl.merge_weights", rl.merge_weights, caps)
  if rl.merge_weights and set(rl.merge_weights) != set(caps):
    fail("rl.merge_weights", f"must give a weight to every branch {caps} (or be empty "
         "for a uniform merge)", dict(rl.merge_weights))
  if method in ("mopd", "static_opd") and not opd.beta > 0:
    fail("rl.opd.beta", f"must be positive for method {method!r} (it only adds "
         "distillation to the experts)", opd.beta)
  if method == "static_opd":
    pair = rl.static_opd
    for name, cap in (("teacher", pair.teacher), ("student", pair.student)):
      if cap not in caps:
        fail(f"rl.static_opd.{name}", f"must be one of rl.capabilities {caps}", cap)
    if pair.teacher == pair.student:
      fail("rl.static_opd.student", "must differ from rl.static_opd.teacher", pair.student)


# ------------------------- meanings of the library-type sections' fields (run_spec `fields=`)

VISION_DOCS = {
    "vision": "toy tubelet-ViT vision encoder",
    "vision.image_size": "input image side in pixels (a multiple of patch_size)",
    "vision.patch_size": "patch side in pixels",
    "vision.channels": "colour channels",
    "vision.num_frames": "video frames per clip (a multiple of tubelet)",
    "vision.tubelet": "frames per tubelet patch",
    "vision.width": "ViT width",
    "vision.depth": "ViT layers",
    "vision.num_heads": "ViT attention heads",
    "vision.mlp_dim": "ViT MLP width",
}
MODEL_DOCS = {
    "vocab_size": "vocabulary size (>= the toy tokenizer's)",
    "d_model": "hidden width",
    "num_layers": "decoder layers",
    "num_heads": "query heads",
    "num_kv_heads": "key/value heads (grouped-query attention); divides num_heads",
    "head_dim": "width of one attention head (even: rotary pairs)",
    "mlp_dim": "SwiGLU hidden width",
    "rope_theta": "rotary embedding base",
    "rms_norm_eps": "RMSNorm epsilon",
    "tie_embeddings": "LM head shares the token embedding",
    "dtype": "compute dtype (float32 | bfloat16); parameters stay float32",
    "remat": "rematerialise each decoder layer in the backward pass (saves memory)",
    "scan_layers": "run the decoder layers under one nn.scan: parameters stacked [layers, ...] "
                   "(layers/... instead of layers_{i}/...), compile time independent of "
                   "depth; HF import stacks, export unstacks",
    "attention_block": "queries per attention block; 0 = all at once. With a block no [T, T] "
                       "score matrix is built (memory-efficient attention for long "
                       "sequences), same values",
    "attention_kernel": "xla | splash (Pallas splash attention; TPU, interpret mode "
                        "elsewhere) | auto (splash on TPU, xla elsewhere); same values",
    "image_token_id": "token id of the <img> placeholder vision embeddings replace",
    **VISION_DOCS,
}
LORA_DOCS = {
    "rank": "adapter rank r; 0 = full fine-tuning (every branch a full copy)",
    "alpha": "adapter scale alpha / r (the PEFT convention)",
    "targets": "projections adapted: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj "
               "(embeddings and the LM head are not)",
}
LOSS_DOCS = {
    "eps_low": "PPO clip below 1",
    "eps_high": "PPO clip above 1 (asymmetric clip-higher)",
    "kl_coef": "KL penalty to the base (0 = none)",
    "kl_estimator": "KL estimator: k1 | k2 | k3",
    "entropy_coef": "entropy bonus",
    "aggregation": "token_mean | seq_mean_token_mean | seq_sum_constant",
    "opd_student_logprob": "student log-prob in the OPD ratio: old | current",
    "tis_cap": "truncated importance sampling: PG weight min(pi_trainer/pi_sampler, cap); "
               "0 = off",
}
KERNEL_DOCS = {
    "backend": "reference | chunked | pallas",
    "vocab_tile": "vocabulary tile of the fused loss (None = the backend's default)",
    "token_tile": "token tile of the fused loss (None = the backend's default)",
}
SCHEDULE_DOCS = {
    "kind": "OPD schedule: cycle | constant | adaptive | none",
    "s_rl": "cycle: RL-only steps per cycle",
    "s_opd": "cycle: RL+OPD steps per cycle (adaptive: phase length)",
    "constant_weight": "constant: OPD weight on every step",
    "overlap_target": "adaptive: start OPD when top-10 overlap falls below",
    "warmup_steps": "RL-only steps before any OPD",
}
