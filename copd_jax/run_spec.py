"""RunSpec: a run's settings as frozen dataclasses, built once from the config by `main`
(config_lib.build) and handed down; nothing below `main` reads the ml_collections config.

The dataclasses mirror the config's sections and field names (`spec.rl.opd.beta` is
`config.rl.opd.beta`). A field an older config may lack has its default here: the one
place such fallbacks live. A section that is already a library type is that type
(config.model -> models.ModelConfig, config.rl.loss -> losses.PolicyLossConfig,
config.rl.kernel -> kernels.KernelConfig, config.rl.opd.schedule -> rl.schedules.OPDSchedule).

Every field carries its one-line meaning (spec_fields.doc), which `--help` prints
(field_docs); a section whose type is a library class documents that class's fields in
its `fields=`. Adding a config field is one line in the section's class below, e.g.
`rank: int = doc("LoRA rank (0 = off)", 0)`; a new section is a new class and one field
of its parent. `from_dict` fills the classes by name and rejects a config field no class
has. `__post_init__` checks a section's own fields; RunSpec's checks those across sections.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from typing import Any, Mapping

from copd_jax.data import math_verifier
from copd_jax.models.model_config import ModelConfig
from copd_jax import spec_fields
from copd_jax.spec_fields import (KERNEL_DOCS, LORA_DOCS, LOSS_DOCS, MODEL_DOCS, SCHEDULE_DOCS,
                                  check_bools, check_float, check_fraction, check_int,
                                  check_rl_methods, check_weights, dict_field, doc, fail,
                                  section)

_spec = functools.partial(dataclasses.dataclass, frozen=True, kw_only=True)


@_spec
class TasksSpec:
  """config.tasks: the procedural task suite (copd_jax/data/toy_tasks.py)."""
  capabilities: tuple[str, ...] = doc("capabilities (or record domains) the base sees")
  difficulty: dict = dict_field("difficulty knob of each procedural generator")
  seed: int = doc("task-suite seed: train stream and held-out set derive from it", 1234)

  def __post_init__(self):
    caps = self.capabilities
    if not caps:
      fail("tasks.capabilities", "must name at least one capability", caps)
    if len(set(caps)) != len(caps):
      fail("tasks.capabilities", "must not repeat a capability", caps)


@_spec
class DataSpec:
  """config.data: prompt/response lengths and where records come from."""
  max_prompt_len: int = doc("prompt tokens per row (vision placeholders included)")
  max_response_len: int = doc("response tokens per row")
  train_files: dict = dict_field("record files per capability (JSONL / Parquet / saved HF "
                                 "dataset; a path, comma-separated paths or a glob); {} = "
                                 "the procedural suite")
  eval_files: dict = dict_field("held-out record files per capability")
  shuffle_seed: int = doc("shuffle seed of record datasets", 0)
  vision_budget: int = doc("Qwen3-VL patches per prompt (media padded to it); 0 = the most "
                           "any record needs", 0)
  reader: str = doc("builtin (errors name the line) | datasets (HF datasets, offline)",
                    "builtin")
  columns: dict = dict_field("record field -> column name, e.g. {'prompt': 'question'} "
                             "(every file; data.sources has columns per source)")
  sources: dict = dict_field("per-source records {name: {path|dataset, split, domain, "
                             "columns, weight}}; a domain's train sources mixed by weight "
                             "(copd_jax/data/sources.py)")
  system_prompt: str = doc("system message before every chat-rendered prompt ('' = none)", "")
  chat_template_kwargs: dict = dict_field("chat-template arguments, e.g. "
                                          "{'enable_thinking': False} (Qwen3)")
  conflict: float = doc("divergence dial in [0, 1]: share of total/remain prompts in their "
                        "shared, cue-only surface form (toy_tasks); 0 = none", 0.0)

  def __post_init__(self):
    check_int("data.shuffle_seed", self.shuffle_seed, allow_zero=True)
    check_int("data.vision_budget", self.vision_budget, allow_zero=True)
    if self.reader not in ("builtin", "datasets"):
      fail("data.reader", "must be 'builtin' or 'datasets'", self.reader)
    check_int("data.max_prompt_len", self.max_prompt_len)
    check_int("data.max_response_len", self.max_response_len)
    check_fraction("data.conflict", self.conflict)
    if not isinstance(self.system_prompt, str):
      fail("data.system_prompt", "must be a string ('' = no system message)",
           self.system_prompt)
    kwargs = self.chat_template_kwargs
    if not isinstance(kwargs, Mapping) or not all(
        isinstance(k, str) and k.isidentifier() for k in kwargs):
      fail("data.chat_template_kwargs", "must map keyword names to values, e.g. "
           "{'enable_thinking': False}", kwargs)


@_spec
class InitSpec:
  """config.init: a local Hugging Face checkpoint to start from ("" = the toy base)."""
  hf_checkpoint: str = doc("local Hugging Face Qwen3 or Qwen3-VL checkpoint directory; '' = "
                           "toy base", "")
  hf_tokenizer: str = doc("tokenizer directory; '' = the checkpoint's own", "")


@_spec
class MeshSpec:
  """config.mesh: sizes of the named mesh axes (one may be -1 = the devices left over)."""
  expert: int = doc("mesh axis over branches (divides num_experts)", 1)
  data: int = doc("mesh axis over the batch", 1)
  fsdp: int = doc("mesh axis for fully sharded parameters", 1)
  tensor: int = doc("mesh axis for tensor parallelism", 1)

  def sizes(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@_spec
class CheckpointSpec:
  """config.checkpoint: training-state checkpoints (copd_jax/train_checkpoint.py)."""
  every_steps: int = doc("save training state every K steps (0 = stage ends + SIGTERM)", 0)
  max_to_keep: int = doc("checkpoints kept per stage", 2)
  async_save: bool = doc("save in the background", True)
  resume: bool = doc("resume from the newest checkpoint in workdir", True)
  save_on_sigterm: bool = doc("SIGTERM saves at the next step boundary and exits 0", True)
  resume_changed_config: bool = doc("resume a workdir whose training config differs, on "
                                    "purpose", False)
  sigterm_grace_s: float = doc("after SIGTERM, seconds to reach a step boundary and save "
                               "before the process exits without saving", 120.0)
  fallback_on_corrupt: bool = doc("a newest checkpoint failing its checksums: False = error, "
                                  "True = restore the newest good one", False)
  allow_unverified: bool = doc("a checkpoint without checksums (arrays, host state, config): "
                               "False = error, True = resume it unverified", False)

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
  seed: int = doc("the base's own seed (init and SFT data)")
  steps: int = doc("SFT steps of the toy base")
  batch_size: int = doc("SFT examples per step")
  learning_rate: float = doc("SFT peak learning rate (warmup + cosine decay)")
  warmup_steps: int = doc("SFT warmup steps")
  weight_decay: float = doc("SFT AdamW weight decay")
  grad_clip_norm: float = doc("SFT global gradient-norm clip")
  mix: dict = dict_field("SFT sampling weight of each capability")
  flaw_rate: dict = dict_field("fraction of each capability's SFT demonstrations showing its "
                               "flawed procedure (toy_flaws.FLAW_KINDS), for RL to correct")
  checkpoint_dir: str = doc("where the base is saved / reused ('' = <workdir>/base_policy)", "")
  reuse_checkpoint: bool = doc("load a saved base with the same recipe instead of training",
                               True)
  log_every: int = doc("SFT steps between log lines", 50)

  def __post_init__(self):
    for name in ("steps", "seed", "warmup_steps"):
      check_int(f"warm_start.{name}", getattr(self, name), allow_zero=True)
    check_int("warm_start.batch_size", self.batch_size)
    check_int("warm_start.log_every", self.log_every)
    check_float("warm_start.learning_rate", self.learning_rate)
    check_float("warm_start.weight_decay", self.weight_decay, allow_zero=True)
    check_float("warm_start.grad_clip_norm", self.grad_clip_norm)
    check_weights("warm_start.mix", self.mix)
    check_weights("warm_start.flaw_rate", self.flaw_rate, fraction=True)


@_spec
class RewardSpec:
  """config.reward: how responses are scored (sandboxed verifier worker processes,
  copd_jax/data/verifiers.py)."""
  fn: str = doc("'module:function' plug-in fn(response, example) -> float; '' = each "
                "example's own verifier", "")
  fns: str = doc("several rewards: comma-separated 'verifier' (built-in) / 'module:function' "
                 "entries, summed with reward.weights; '' = reward.fn alone", "")
  weights: tuple = doc("one weight per reward.fns entry, e.g. (1.0, 0.2); () = all 1.0", ())
  timeout_s: float = doc("per-answer time limit in seconds (over it: reward 0)",
                         math_verifier.DEFAULT_MATH_TIMEOUT_S)
  step_budget_s: float = doc("time budget in seconds for one step's (or eval batch's) answers",
                             math_verifier.DEFAULT_STEP_BUDGET_S)
  workers: int = doc("verifier worker processes (at most the CPUs this process may use)",
                     math_verifier.DEFAULT_WORKERS)
  worker_memory_mb: int = doc("each verifier worker's memory limit in MiB (over it: that "
                              "answer scores 0, the worker is replaced and counted)",
                              math_verifier.DEFAULT_WORKER_MEMORY_MB)
  max_error_fraction: float = doc("fraction of a batch's responses whose plug-in fails "
                                  "(raises, NaN, inf, non-number) at which the run stops; "
                                  "1.0 = all of them, 0.0 = any",
                                  math_verifier.DEFAULT_MAX_ERROR_FRACTION)

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
  num_examples: int = doc("held-out examples per capability in the final evaluation")
  batch_size: int = doc("prompts per evaluation sampler call")
  pass_samples: int = doc("samples per prompt for pass@k (0 = greedy accuracy only)", 0)
  pass_k: tuple = doc("the k of pass@k (each <= pass_samples)", (1,))
  pass_temperature: float = doc("sampling temperature of the pass@k samples", 1.0)
  pass_threshold: float = doc("pass@k: a sample passes when its reward is >= this (1.0 = "
                              "fully correct; partial credit below it is no pass)", 1.0)

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
  completions: int = doc("prompts per capability/branch logged with their responses "
                         "(0 = off)", 0)
  completions_every: int = doc("RL steps between logged training completions (0 = evals "
                               "only)", 0)
  wandb: bool = doc("mirror the logs to Weights & Biases (needs the wandb extra)", False)
  wandb_project: str = doc("wandb project name", "copd-jax")
  wandb_mode: str = doc("wandb mode: offline (no network) | online | disabled", "offline")

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
  temperature: float = doc("rollout temperature (RL methods: must be 1)")
  top_k: int = doc("rollout top-k (RL methods: must be 0 = full vocabulary)")
  top_p: float = doc("rollout nucleus mass (RL methods: must be 1)")
  max_new_tokens: int = doc("response tokens sampled at most")

  def __post_init__(self):
    check_float("sampling.temperature", self.temperature)
    check_int("sampling.top_k", self.top_k, allow_zero=True)
    if check_float("sampling.top_p", self.top_p) > 1:
      fail("sampling.top_p", "must be in (0, 1]", self.top_p)
    check_int("sampling.max_new_tokens", self.max_new_tokens)


@_spec
class OPDSpec:
  """config.rl.opd: who teaches whom, how strongly, when, and with which estimator."""
  topology: str = doc("who teaches whom: hub | full | ring | none")
  hub: str = doc("the hub branch of the hub topology (derived from rl.capabilities)")
  beta: float = doc("OPD rate of every branch")
  schedule: "OPDSchedule" = doc("when OPD is on (rl/schedules.py)", fields=SCHEDULE_DOCS)
  branch_beta: dict = dict_field("per-capability OPD rates, e.g. {'text': 0.5}")
  estimator: str = doc("OPD signal: sampled_token (the paper's) | top_k (reverse KL on the "
                       "teacher's top k) | full_vocab (exact; one device, small vocab)",
                       "sampled_token")
  top_k: int = doc("k of the top_k estimator: tokens (ids + log-probs) a teacher sends", 16)

  def __post_init__(self):
    if self.topology not in ("hub", "full", "ring", "none"):
      fail("rl.opd.topology", "must be one of ('hub', 'full', 'ring', 'none')", self.topology)
    check_float("rl.opd.beta", self.beta, allow_zero=True)
    check_weights("rl.opd.branch_beta", self.branch_beta)


@_spec
class StaticOPDSpec:
  """config.rl.static_opd: the one-way pair of the static OPD baseline."""
  teacher: str = doc("static OPD: the frozen teacher expert")
  student: str = doc("static OPD: the student expert")


@_spec
class MOPDSpec:
  """config.rl.mopd: the MOPD baseline's options."""
  cross_outcome_reward: bool = doc("MOPD: add the outcome reward to distillation rows", False)


@_spec
class RLSpec:
  """config.rl: the CoPD trainer's settings shared by every RL method."""
  capabilities: tuple[str, ...] = doc("capabilities trained, one branch each (text,image sets "
                                      "num_experts=2)")
  steps: int = doc("optimizer steps of ONE expert (mixed RLVR: x capabilities)")
  native_prompts: int = doc("GRPO prompts per branch per step")
  samples_per_prompt: int = doc("G: rollouts per prompt")
  cross_prompts: int = doc("prompts per branch per OPD step from its teachers' data")
  learning_rate: float = doc("RL (peak) learning rate")
  grad_clip_norm: float = doc("RL global gradient-norm clip per branch")
  weight_decay: float = doc("RL AdamW weight decay")
  scale_by_std: bool = doc("GRPO advantages divided by the group std (False = Dr.GRPO)")
  loss: "PolicyLossConfig" = doc("policy loss (copd_jax/losses.py PolicyLossConfig)",
                                 fields=LOSS_DOCS)
  kernel: "KernelConfig" = doc("fused LM-head loss implementation", fields=KERNEL_DOCS)
  opd: OPDSpec = doc("on-policy distillation between the branches")
  distill_steps: int = doc("steps of the static OPD / MOPD distillation stage")
  static_opd: StaticOPDSpec = doc("the static OPD baseline's teacher and student")
  eval_every: int = doc("RL steps between held-out evaluations")
  eval_examples: int = doc("held-out examples per capability during training")
  diagnostics_every: int = doc("RL steps between overlap / symmetric-KL diagnostics")
  diagnostic_prompts: int = doc("prompts per branch for the diagnostics")
  log_every: int = doc("RL steps between progress lines")
  max_nonfinite_steps_in_row: int = doc("non-finite steps in a row that stop the run")
  lr_schedule: str = doc("'constant' or 'cosine' (decay over each stage's steps)", "constant")
  lr_end_fraction: float = doc("cosine schedule: final learning rate / rl.learning_rate", 0.0)
  merge_weights: dict = dict_field("per-branch merge weights ({} = uniform average)")
  experts_dir: str = doc("a finished experts run to reuse as stage 1 ('' = train them)", "")
  mopd: MOPDSpec = section(MOPDSpec, "the MOPD baseline's options")
  max_nonfinite_steps_total: int | None = doc("skipped (non-finite) updates in one stage, all "
                                              "branches together, before the run stops "
                                              "(None = no limit)", None)
  micro_batch_rows: int = doc("rows per gradient-accumulation micro-batch (0 = all at once)", 0)

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
    caps = tuple(self.capabilities)
    if not caps or len(set(caps)) != len(caps):
      fail("rl.capabilities", "must name distinct capabilities", caps)
    check_weights("rl.merge_weights", self.merge_weights)
    if self.merge_weights and sum(self.merge_weights.values()) <= 0:
      fail("rl.merge_weights", "must give some branch a positive weight",
           dict(self.merge_weights))


@_spec
class PodSpec:
  """config.pod: the TPU slice a pod config is sized for (lowering and memory only)."""
  num_chips: int = doc("chips in the slice")
  tpu: str = doc("TPU generation (v5p | v5e | v6e)", "")
  topology: str = doc("the slice's chips as AxB[xC], multiplying to num_chips", "")
  hbm_bytes_per_chip: int = doc("HBM bytes of one chip (the memory check's budget)", 0)
  qwen3_vl: dict = dict_field("the Qwen3-VL architecture (config.json fields) the pod "
                              "compile lowers")


METHODS = ("base", "experts", "mixed_rlvr", "static_opd", "mopd", "copd")


@_spec
class RunSpec:
  """A run's settings; `config_json` is the config as resolved (the run directory's
  record and hash: copd_jax/run_dir.py)."""
  method: str = doc("what runs: " + " | ".join(METHODS))
  seed: int = doc("RL seed (prompt order, sampling keys); the base has warm_start.seed")
  workdir: str = doc("run directory; unset = runs/<method>[-<overrides>]-<config hash>")
  num_experts: int = doc("branches trained at once; derived from rl.capabilities when unset")
  model: ModelConfig = doc("toy Qwen3-layout decoder; with init.hf_checkpoint only dtype, "
                           "remat, attention_block and attention_kernel are read",
                           fields=MODEL_DOCS)
  tasks: TasksSpec = doc("the procedural task suite")
  data: DataSpec = doc("prompt / response lengths and the record files")
  warm_start: WarmStartSpec = doc("the SFT warm-start of the toy base")
  eval: EvalSpec = doc("the held-out evaluation")
  sampling: SamplingSpec = doc("the RL sampler")
  init: InitSpec = section(InitSpec, "a Hugging Face checkpoint to start from")
  mesh: MeshSpec = section(MeshSpec, "device mesh sizes (one may be -1 = the devices left "
                                     "over)")
  checkpoint: CheckpointSpec = section(CheckpointSpec, "training-state checkpoints")
  reward: RewardSpec = section(RewardSpec, "how responses are scored (sandboxed verifier "
                                           "worker processes)")
  log: LogSpec = section(LogSpec, "logged completions and the wandb mirror")
  rl: RLSpec | None = doc("the RL methods' trainer (None for `base`)", None)
  pod: PodSpec | None = doc("the pod slice a pod config is sized for (lowering only)", None)
  # config.model.lora as a models.lora.LoraSpec (None: full fine-tuning). Kept out of
  # `model` so that a saved base's model fields never depend on how its branches train.
  lora: Any = doc("LoRA branches: every branch a low-rank adapter on one shared frozen base",
                  None, fields=LORA_DOCS, config_key="model.lora")
  config_json: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __post_init__(self):
    if not isinstance(self.workdir, str) or not self.workdir.strip():
      fail("workdir", "must be a non-empty directory path", self.workdir)
    if self.method not in METHODS:
      fail("method", f"must be one of {METHODS}", self.method)
    check_int("num_experts", self.num_experts)
    if self.method in ("base", "mixed_rlvr") and self.num_experts != 1:
      fail("num_experts", f"must be 1 for method {self.method!r} (one policy)",
           self.num_experts)
    if not isinstance(self.seed, numbers.Integral):
      fail("seed", "must be an integer", self.seed)
    if self.data.train_files or self.data.sources:  # record files: domains, not task names
      from copd_jax.data import examples
      caps = self.tasks.capabilities
      for cap in caps:
        if not examples.is_domain_name(cap):
          fail("tasks.capabilities", f"has {cap!r}; with record files (config.data."
               "train_files or sources) capabilities are domain names: [a-z][a-z0-9_]*", caps)
    if self.method != "base":
      if self.rl is None:
        fail("rl", f"section is required for method {self.method!r}", None)
      check_rl_methods(self)


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


# ---------------------------------------------------------------------- field meanings

_NOT_CONFIG = ("config_json",)  # RunSpec fields that are no config setting


def field_docs(cls=None, prefix: str = "") -> dict[str, str]:
  """{dotted config field: its one-line meaning} for every field of cls (default RunSpec)
  and of its sections, read from the fields' `doc` metadata (spec_fields.doc); a
  library-type section contributes its `fields=` docs. '' marks a field without one."""
  cls = RunSpec if cls is None else cls
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in _NOT_CONFIG:
      continue
    key = f.metadata.get(spec_fields.CONFIG_KEY) or prefix + f.name
    out[key] = f.metadata.get(spec_fields.DOC, "")
    for sub, meaning in f.metadata.get(spec_fields.SUBFIELDS, {}).items():
      out[f"{key}.{sub}"] = meaning
    hint = _strip_optional(_hints(cls)[f.name])
    if _is_spec(hint):
      out.update(field_docs(hint, key + "."))
  return out


@functools.cache
def _run_field_docs() -> dict[str, str]:
  return field_docs()


def field_doc(dotted: str) -> str:
  """The meaning of a dotted config field: its own doc, or, for an entry of a mapping field
  (`tasks.difficulty.text`), that field's; '' when none (a declared field without a doc
  reads '', never its section's)."""
  docs = _run_field_docs()
  parts = dotted.split(".")
  for n in range(len(parts), 0, -1):
    key = ".".join(parts[:n])
    if key in docs:
      return docs[key]
  return ""
