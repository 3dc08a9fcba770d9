"""RunSpec: a run's settings as frozen dataclasses, built once from the config by `main`
(config_lib.build) and handed down; nothing below `main` reads the ml_collections config.

The dataclasses mirror the config's sections and field names (`spec.rl.opd.beta` is
`config.rl.opd.beta`). A field an older config may lack has its default here: the one
place such fallbacks live. A section that is already a library type is that type
(config.model -> models.ModelConfig, config.rl.loss -> losses.PolicyLossConfig,
config.rl.kernel -> kernels.KernelConfig, config.rl.opd.schedule -> rl.schedules.OPDSchedule).

Adding a config field is one line in the section's class below, e.g.
`rank: int = 0  # LoRA rank (0 = off)`; a new section is a new class and one field of its
parent. `from_dict` fills the classes by name and rejects a config field no class has.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, Mapping

from copd_jax.data import math_verifier
from copd_jax.models.model_config import ModelConfig

_spec = functools.partial(dataclasses.dataclass, frozen=True, kw_only=True)


def _dict():
  return dataclasses.field(default_factory=dict)


def _section(cls):
  return dataclasses.field(default_factory=cls)


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


def check_bools(section: str, spec, names) -> None:
  for name in names:
    if not isinstance(getattr(spec, name), bool):
      fail(f"{section}.{name}", "must be True or False", getattr(spec, name))


@_spec
class TasksSpec:
  """config.tasks: the procedural task suite (copd_jax/data/toy_tasks.py)."""
  capabilities: tuple[str, ...]
  difficulty: dict = _dict()  # capability -> difficulty level of its generator
  seed: int = 1234  # task-suite seed: train stream and held-out set derive from it


@_spec
class DataSpec:
  """config.data: prompt/response lengths and where records come from."""
  max_prompt_len: int
  max_response_len: int
  train_files: dict = _dict()  # capability -> record files; {} = the procedural suite
  eval_files: dict = _dict()
  shuffle_seed: int = 0
  vision_budget: int = 0  # Qwen3-VL patches per prompt; 0 = the most any record needs
  reader: str = "builtin"  # builtin | datasets
  columns: dict = _dict()  # record field -> column name
  sources: dict = _dict()  # name -> {path | dataset, split, domain, columns, weight}
  system_prompt: str = ""
  chat_template_kwargs: dict = _dict()
  conflict: float = 0.0  # the divergence dial (toy_tasks, CONFLICT_FAMILIES)

  def __post_init__(self):
    check_int("data.shuffle_seed", self.shuffle_seed, allow_zero=True)
    check_int("data.vision_budget", self.vision_budget, allow_zero=True)
    if self.reader not in ("builtin", "datasets"):
      fail("data.reader", "must be 'builtin' or 'datasets'", self.reader)
    check_int("data.max_prompt_len", self.max_prompt_len)
    check_int("data.max_response_len", self.max_response_len)
    check_fraction("data.conflict", self.conflict)


@_spec
class InitSpec:
  """config.init: a local Hugging Face checkpoint to start from ("" = the toy base)."""
  hf_checkpoint: str = ""
  hf_tokenizer: str = ""  # tokenizer directory when not inside hf_checkpoint


@_spec
class MeshSpec:
  """config.mesh: sizes of the named mesh axes (one may be -1)."""
  expert: int = 1
  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  def sizes(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@_spec
class CheckpointSpec:
  """config.checkpoint: training-state checkpoints (copd_jax/train_checkpoint.py)."""
  every_steps: int = 0
  max_to_keep: int = 2
  async_save: bool = True
  resume: bool = True
  save_on_sigterm: bool = True
  resume_changed_config: bool = False
  sigterm_grace_s: float = 120.0
  fallback_on_corrupt: bool = False
  allow_unverified: bool = False

  def __post_init__(self):
    check_int("checkpoint.every_steps", self.every_steps, allow_zero=True)
    check_int("checkpoint.max_to_keep", self.max_to_keep)
    check_bools("checkpoint", self, ("async_save", "resume", "save_on_sigterm",
                                     "resume_changed_config", "fallback_on_corrupt",
                                     "allow_unverified"))
    check_float("checkpoint.sigterm_grace_s", self.sigterm_grace_s)


@_spec
class WarmStartSpec:
  """config.warm_start: the SFT warm-start of the toy base policy."""
  seed: int
  steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int
  weight_decay: float
  grad_clip_norm: float
  mix: dict = _dict()  # capability -> SFT weight
  flaw_rate: dict = _dict()  # capability -> fraction of flawed demonstrations
  checkpoint_dir: str = ""  # "" = <workdir>/base_policy
  reuse_checkpoint: bool = True
  log_every: int = 50

  def __post_init__(self):
    for name in ("steps", "seed", "warmup_steps"):
      check_int(f"warm_start.{name}", getattr(self, name), allow_zero=True)
    check_int("warm_start.batch_size", self.batch_size)
    check_int("warm_start.log_every", self.log_every)
    check_float("warm_start.learning_rate", self.learning_rate)
    check_float("warm_start.weight_decay", self.weight_decay, allow_zero=True)
    check_float("warm_start.grad_clip_norm", self.grad_clip_norm)


@_spec
class RewardSpec:
  """config.reward: the verifiers' limits and plug-ins (copd_jax/data/verifiers.py)."""
  fn: str = ""  # 'module:function' plug-in for every example; "" = each example's verifier
  fns: str = ""  # comma-separated weighted reward functions ("" = the single `fn`)
  weights: tuple = ()  # one per entry of fns (() = all 1.0)
  timeout_s: float = math_verifier.DEFAULT_MATH_TIMEOUT_S  # per answer
  step_budget_s: float = math_verifier.DEFAULT_STEP_BUDGET_S  # per step or eval batch
  workers: int = math_verifier.DEFAULT_WORKERS  # verifier worker processes
  worker_memory_mb: int = math_verifier.DEFAULT_WORKER_MEMORY_MB
  max_error_fraction: float = math_verifier.DEFAULT_MAX_ERROR_FRACTION

  def __post_init__(self):
    check_float("reward.timeout_s", self.timeout_s)
    check_float("reward.step_budget_s", self.step_budget_s)
    check_int("reward.workers", self.workers)
    if check_int("reward.worker_memory_mb", self.worker_memory_mb) < \
        math_verifier.MIN_WORKER_MEMORY_MB:
      fail("reward.worker_memory_mb", f"must be at least {math_verifier.MIN_WORKER_MEMORY_MB} "
           "(MiB: a worker imports sympy and math-verify)", self.worker_memory_mb)
    check_fraction("reward.max_error_fraction", self.max_error_fraction)
    if not isinstance(self.fn, str):
      fail("reward.fn", "must be '' or 'module:function'", self.fn)


@_spec
class EvalSpec:
  """config.eval: the held-out evaluation (greedy accuracy, optional pass@k)."""
  num_examples: int
  batch_size: int
  pass_samples: int = 0
  pass_k: tuple = (1,)
  pass_temperature: float = 1.0
  pass_threshold: float = 1.0  # a sample passes when its reward is >= this

  def __post_init__(self):
    check_int("eval.num_examples", self.num_examples)
    check_int("eval.batch_size", self.batch_size)
    n = check_int("eval.pass_samples", self.pass_samples, allow_zero=True)
    ks = self.pass_k
    if not isinstance(ks, (tuple, list)) or not ks:
      fail("eval.pass_k", "must be a non-empty tuple of positive integers", ks)
    for k in ks:
      if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        fail("eval.pass_k", "must hold positive integers", ks)
      if n and k > n:
        fail("eval.pass_k", f"must not exceed eval.pass_samples={n} (pass@k needs n >= k "
             "samples)", ks)
    check_float("eval.pass_temperature", self.pass_temperature)
    check_float("eval.pass_threshold", self.pass_threshold)


@_spec
class LogSpec:
  """config.log: completions and the optional Weights & Biases mirror (absent = off)."""
  completions: int = 0
  completions_every: int = 0
  wandb: bool = False
  wandb_project: str = "copd-jax"
  wandb_mode: str = "offline"  # offline | online | disabled

  def __post_init__(self):
    check_int("log.completions", self.completions, allow_zero=True)
    check_int("log.completions_every", self.completions_every, allow_zero=True)
    check_bools("log", self, ("wandb",))
    if self.wandb_mode not in ("offline", "online", "disabled"):
      fail("log.wandb_mode", "must be one of ('offline', 'online', 'disabled')", self.wandb_mode)
    if not isinstance(self.wandb_project, str) or not self.wandb_project:
      fail("log.wandb_project", "must be a non-empty string", self.wandb_project)


@_spec
class SamplingSpec:
  """config.sampling: the RL sampler's distribution and length."""
  temperature: float
  top_k: int
  top_p: float
  max_new_tokens: int

  def __post_init__(self):
    check_float("sampling.temperature", self.temperature)
    check_int("sampling.top_k", self.top_k, allow_zero=True)
    if check_float("sampling.top_p", self.top_p) > 1:
      fail("sampling.top_p", "must be in (0, 1]", self.top_p)
    check_int("sampling.max_new_tokens", self.max_new_tokens)


@_spec
class OPDSpec:
  """config.rl.opd: who teaches whom, how strongly, when, and with which estimator."""
  topology: str  # hub | full | ring | none
  hub: str
  beta: float
  schedule: "OPDSchedule"
  branch_beta: dict = _dict()  # capability -> beta (asymmetric rates)
  estimator: str = "sampled_token"  # sampled_token | top_k | full_vocab
  top_k: int = 16

  def __post_init__(self):
    if self.topology not in ("hub", "full", "ring", "none"):
      fail("rl.opd.topology", "must be one of ('hub', 'full', 'ring', 'none')", self.topology)
    check_float("rl.opd.beta", self.beta, allow_zero=True)
    for cap, beta in self.branch_beta.items():
      check_float(f"rl.opd.branch_beta.{cap}", beta, allow_zero=True)


@_spec
class StaticOPDSpec:
  teacher: str
  student: str


@_spec
class MOPDSpec:
  cross_outcome_reward: bool = False


@_spec
class RLSpec:
  """config.rl: the CoPD trainer's settings shared by every RL method."""
  capabilities: tuple[str, ...]
  steps: int
  native_prompts: int
  samples_per_prompt: int
  cross_prompts: int
  learning_rate: float
  grad_clip_norm: float
  weight_decay: float
  scale_by_std: bool
  loss: "PolicyLossConfig"
  kernel: "KernelConfig"
  opd: OPDSpec
  distill_steps: int
  static_opd: StaticOPDSpec
  eval_every: int
  eval_examples: int
  diagnostics_every: int
  diagnostic_prompts: int
  log_every: int
  max_nonfinite_steps_in_row: int
  lr_schedule: str = "constant"
  lr_end_fraction: float = 0.0
  merge_weights: dict = _dict()  # capability -> merge weight; {} = uniform
  experts_dir: str = ""
  mopd: MOPDSpec = _section(MOPDSpec)
  max_nonfinite_steps_total: int | None = None  # None = no limit
  micro_batch_rows: int = 0  # rows per gradient-accumulation micro-batch (0 = all)

  def __post_init__(self):
    for name in ("steps", "native_prompts", "samples_per_prompt", "eval_every",
                 "eval_examples", "diagnostic_prompts", "diagnostics_every", "log_every"):
      check_int(f"rl.{name}", getattr(self, name))
    check_int("rl.cross_prompts", self.cross_prompts, allow_zero=True)
    check_int("rl.max_nonfinite_steps_in_row", self.max_nonfinite_steps_in_row)
    if self.max_nonfinite_steps_total is not None:
      check_int("rl.max_nonfinite_steps_total", self.max_nonfinite_steps_total)
    if self.samples_per_prompt < 2:  # one sample per group: its GRPO advantage is always 0
      fail("rl.samples_per_prompt", "must be at least 2 (a group of one sample has no "
           "reward variance, so its advantage is always 0)", self.samples_per_prompt)
    check_int("rl.micro_batch_rows", self.micro_batch_rows, allow_zero=True)
    if self.micro_batch_rows % self.samples_per_prompt:  # a micro-batch holds whole prompts
      fail("rl.micro_batch_rows", f"must be a multiple of rl.samples_per_prompt "
           f"({self.samples_per_prompt}): a micro-batch holds a prompt's samples together",
           self.micro_batch_rows)
    check_int("rl.distill_steps", self.distill_steps, allow_zero=True)
    check_float("rl.learning_rate", self.learning_rate)
    if self.lr_schedule not in ("constant", "cosine"):
      fail("rl.lr_schedule", "must be 'constant' or 'cosine'", self.lr_schedule)
    end = self.lr_end_fraction
    if not isinstance(end, (int, float)) or isinstance(end, bool) or not 0.0 <= end <= 1.0:
      fail("rl.lr_end_fraction", "must be a number in [0, 1]", end)
    check_float("rl.grad_clip_norm", self.grad_clip_norm)
    check_float("rl.weight_decay", self.weight_decay, allow_zero=True)


@_spec
class PodSpec:
  """config.pod: the TPU slice a pod config is sized for (lowering and memory only)."""
  num_chips: int
  tpu: str = ""
  topology: str = ""
  hbm_bytes_per_chip: int = 0
  qwen3_vl: dict = _dict()  # the Qwen3-VL architecture the pod compile lowers


@_spec
class RunSpec:
  """A run's settings; `config_json` is the config as resolved (the run directory's
  record and hash: copd_jax/run_dir.py)."""
  method: str
  seed: int
  workdir: str
  num_experts: int
  model: ModelConfig
  tasks: TasksSpec
  data: DataSpec
  warm_start: WarmStartSpec
  eval: EvalSpec
  sampling: SamplingSpec
  init: InitSpec = _section(InitSpec)
  mesh: MeshSpec = _section(MeshSpec)
  checkpoint: CheckpointSpec = _section(CheckpointSpec)
  reward: RewardSpec = _section(RewardSpec)
  log: LogSpec = _section(LogSpec)
  rl: RLSpec | None = None  # None for `base`
  pod: PodSpec | None = None
  # config.model.lora as a models.lora.LoraSpec (None: full fine-tuning). Kept out of
  # `model` so that a saved base's model fields never depend on how its branches train.
  lora: Any = None
  config_json: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


# --------------------------------------------------------------------------- building


def _library_types() -> dict[str, type]:
  """The library classes some sections are (imported here: they import jax)."""
  from copd_jax import kernels, losses
  from copd_jax.rl import schedules
  return {"PolicyLossConfig": losses.PolicyLossConfig, "KernelConfig": kernels.KernelConfig,
          "OPDSchedule": schedules.OPDSchedule}


@functools.cache
def _hints(cls) -> dict[str, Any]:
  namespace = dict(globals(), **_library_types())
  return typing.get_type_hints(cls, globalns=namespace)


def _strip_optional(hint):
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1:
      return args[0]
  return hint


def _is_spec(cls) -> bool:
  return isinstance(cls, type) and cls.__module__ == __name__ and dataclasses.is_dataclass(cls)


def _value(hint, value, where: str):
  hint = _strip_optional(hint)
  if value is None:
    return None
  if _is_spec(hint):
    if not isinstance(value, Mapping):
      raise ValueError(f"config.{where} must be a section (a dict of fields), got {value!r}")
    return from_dict(hint, value, where + ".")
  if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a library config type
    if isinstance(value, hint):
      return value
    if not isinstance(value, Mapping):
      raise ValueError(f"config.{where} must be a section (a dict of fields), got {value!r}")
    try:
      return hint(**dict(value))
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.{where}: {e}") from None
  if typing.get_origin(hint) is tuple or hint is tuple:
    return tuple(value) if isinstance(value, list) else value
  if hint is dict and isinstance(value, Mapping):
    return dict(value)
  return value


def from_dict(cls, fields: Mapping[str, Any], where: str = ""):
  """cls (a spec class) from a plain nested dict with the config's field names; a field
  cls lacks is a ValueError naming it, a missing field takes cls's default."""
  model = fields.get("model") if cls is RunSpec else None
  if isinstance(model, Mapping) and "lora" in model:  # config.model.lora -> spec.lora
    from copd_jax.models import lora
    lora_fields = model["lora"]
    fields = dict(fields, model={k: v for k, v in model.items() if k != "lora"})
    return dataclasses.replace(from_dict(cls, fields, where),
                               lora=lora.spec_from_dict(lora_fields))
  hints = _hints(cls)
  names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "config_json"]
  unknown = sorted(set(fields) - set(names))
  if unknown:
    raise ValueError(f"config.{where}{unknown[0]} is not a run setting: add it to "
                     f"{cls.__name__} in copd_jax/run_spec.py (known: {sorted(names)})")
  kwargs = {name: _value(hints[name], fields[name], where + name)
            for name in names if name in fields}
  try:
    return cls(**kwargs)
  except TypeError as e:
    missing = [n for n in names if n not in fields]
    raise ValueError(f"config.{where.rstrip('.') or '<root>'} lacks a required field "
                     f"({e}; not given: {missing})") from None


def replace(spec, dotted: str, value):
  """spec with the field at `dotted` ('rl.native_prompts') set to value (a new spec)."""
  head, _, rest = dotted.partition(".")
  if not rest:
    return dataclasses.replace(spec, **{head: value})
  return dataclasses.replace(spec, **{head: replace(getattr(spec, head), rest, value)})


def replace_fields(spec, changes: Mapping[str, Any]):
  """spec with every {dotted field: value} of changes set (a new spec)."""
  # One dataclasses.replace per section, so that fields checked together (num_heads and
  # num_kv_heads) change together.
  direct, nested = {}, {}
  for dotted, value in changes.items():
    head, _, rest = dotted.partition(".")
    if rest:
      nested.setdefault(head, {})[rest] = value
    else:
      direct[head] = value
  for head, sub in nested.items():
    direct[head] = replace_fields(getattr(spec, head), sub)
  return dataclasses.replace(spec, **direct)


def as_dict(section) -> dict:
  """A section (a spec or library dataclass) as a plain nested dict."""
  return dataclasses.asdict(section)
