"""Checks a run's ml_collections config and translates it into a RunSpec (build), before
anything is built or compiled.

Every error names the offending field (`config.warm_start.batch_size ...`), so a typo
on the command line fails in a second rather than deep inside a jitted function. The
RunSpec's dataclasses check their own fields and those across sections (run_spec,
__post_init__); the checks here need the raw config (non-finite values, unset required
paths, the model before it is built), files, or this machine.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Mapping

import ml_collections

from copd_jax import run_spec, spec_fields
from copd_jax.data import toy_tasks
from copd_jax.models.model_config import ATTENTION_KERNELS

from copd_jax.models.model_config import COMPUTE_DTYPES

_fail = spec_fields.fail


def _positive_int(cfg: Mapping[str, Any], field: str, prefix: str, allow_zero=False) -> int:
  return spec_fields.check_int(f"{prefix}{field}", cfg[field], allow_zero)


def _positive_float(cfg, field: str, prefix: str, allow_zero=False) -> float:
  return spec_fields.check_float(f"{prefix}{field}", cfg[field], allow_zero)


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
  if not isinstance(m.get("scan_layers", False), bool):
    _fail(f"{prefix}scan_layers", "must be a bool", m.scan_layers)
  if m.get("attention_kernel", "xla") not in ATTENTION_KERNELS:
    _fail(f"{prefix}attention_kernel", f"must be one of {ATTENTION_KERNELS}", m.attention_kernel)
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


def validate_lora_fits(spec: run_spec.RunSpec, model_fields) -> None:
  """The LoRA rank at most the smaller dimension of every target projection of
  config.model (rank, alpha and targets were checked when spec.lora was built). A Hugging
  Face checkpoint's own sizes are checked when its adapters are built (lora.init_adapters)."""
  from copd_jax.models import lora
  if spec.lora is not None and not spec.init.hf_checkpoint:
    lora.check_rank_fits(spec.lora, lora.projection_dims(model_fields))


def _check_lengths_fit_tasks(cfg, caps) -> None:
  """The generators' longest prompt/solution at these difficulties must fit the arrays."""
  v = cfg.model.vision
  num_vision_tokens = (v.num_frames // v.tubelet) * (v.image_size // v.patch_size) ** 2
  need_prompt, need_response = toy_tasks.max_lengths(
      caps, difficulty=dict(cfg.tasks.difficulty), num_vision_tokens=num_vision_tokens,
      image_size=v.image_size, num_frames=v.num_frames)
  if cfg.data.max_prompt_len < need_prompt:
    _fail("data.max_prompt_len", f"must be >= {need_prompt} (longest prompt of these tasks "
          "at these difficulties, vision tokens included)", cfg.data.max_prompt_len)
  if cfg.data.max_response_len < need_response:
    _fail("data.max_response_len", f"must be >= {need_response} (longest worked solution "
          "plus <eos> at these difficulties)", cfg.data.max_response_len)


def _nonfinite_fields(node, prefix: str):
  """(dotted name, value) of every NaN / inf float in a config (nested dicts, lists)."""
  if isinstance(node, (ml_collections.ConfigDict, dict)):
    for key, value in node.items():
      yield from _nonfinite_fields(value, f"{prefix}.{key}" if prefix else str(key))
  elif isinstance(node, (list, tuple)):
    for i, value in enumerate(node):
      yield from _nonfinite_fields(value, f"{prefix}[{i}]")
  elif isinstance(node, float) and not math.isfinite(node):
    yield prefix, node


def validate_reward(r: run_spec.RewardSpec) -> None:
  """config.reward (copd_jax/data/verifiers.py) beyond RewardSpec's own checks: the pool
  size this machine allows, and plug-ins, which must import and be callable."""
  from copd_jax.data import verifier_pool
  if r.workers > verifier_pool.cpu_cap():
    _fail("reward.workers", f"must be at most {verifier_pool.cpu_cap()} (the CPUs this "
          "process may use: each worker is a process)", r.workers)
  if r.fn:
    from copd_jax.data import math_verifier
    _wrap("reward.fn", lambda: math_verifier.load_plugin(r.fn))
  if r.fns:
    from copd_jax.data import math_verifier, reward_fns
    _, fns = _wrap("reward", lambda: reward_fns.from_config(r))
    for fn in fns:
      if fn.spec != reward_fns.BUILTIN:
        _wrap("reward.fns", lambda: math_verifier.load_plugin(fn.spec))


def validate_chat(spec: run_spec.RunSpec) -> None:
  """config.data.system_prompt / chat_template_kwargs: only a checkpoint's tokenizer has a
  chat template to pass them to (DataSpec checks their types)."""
  system, kwargs = spec.data.system_prompt, spec.data.chat_template_kwargs
  if (system or kwargs) and not spec.init.hf_checkpoint:
    field = "data.system_prompt" if system else "data.chat_template_kwargs"
    _fail(field, "needs config.init.hf_checkpoint (a tokenizer with a chat template); the "
          "toy tokenizer renders no chat", system or dict(kwargs))


def validate_config(cfg: ml_collections.ConfigDict) -> run_spec.RunSpec:
  """Raises ValueError naming the first invalid field of a run config; returns its RunSpec.
  The RunSpec's dataclasses check their fields and most checks across sections
  (__post_init__); here: unset required paths, non-finite values and the model fields
  before anything is built, and the checks against the procedural suite, files and this
  machine."""
  check_required_paths(cfg)
  for field, value in _nonfinite_fields(cfg, ""):  # inf / NaN are never a setting
    _fail(field, "must be a finite number", value)
  validate_model(cfg.model)  # before spec_of builds models.ModelConfig, which checks too
  spec = spec_of(cfg)  # each section's checks and RunSpec's across them (run_spec)
  validate_mesh(cfg)
  validate_lora_fits(spec, cfg.model)

  caps = tuple(cfg.tasks.capabilities)
  records = validate_records_and_init(cfg)
  for cap in caps:
    if not records and cap not in toy_tasks.FAMILIES:
      _fail("tasks.capabilities", f"has unknown task {cap!r}; known: {toy_tasks.FAMILY_NAMES} "
            "(other domain names need record files in config.data.train_files)", caps)
  if not records:  # difficulty and the length bounds describe the procedural suite only
    _check_capability_dict(cfg.tasks.difficulty, "tasks.difficulty", caps)
    for cap in caps:
      if cap not in cfg.tasks.difficulty:
        _fail("tasks.difficulty", f"needs an entry for {cap!r}", dict(cfg.tasks.difficulty))
      _positive_int(cfg.tasks.difficulty, cap, "tasks.difficulty.", allow_zero=True)
    _check_lengths_fit_tasks(cfg, caps)  # record prompts are measured at setup

  # After the tasks' lengths: a too short data.max_response_len is the error to fix first.
  if spec.sampling.max_new_tokens > spec.data.max_response_len:
    _fail("sampling.max_new_tokens", f"must not exceed data.max_response_len="
          f"{spec.data.max_response_len}", spec.sampling.max_new_tokens)
  ws = spec.warm_start
  if not spec.init.hf_checkpoint:  # the SFT mix is unused when a checkpoint is the base
    _check_capability_dict(ws.mix, "warm_start.mix", caps)
    if sum(ws.mix.values()) <= 0:
      _fail("warm_start.mix", "must give some capability a positive weight", dict(ws.mix))
    _check_capability_dict(ws.flaw_rate, "warm_start.flaw_rate", caps)

  validate_reward(spec.reward)
  validate_chat(spec)
  validate_log(spec.log)

  # Last: the sizes, once every field is known valid; an error names the field.
  from copd_jax import memory_budget
  memory_budget.check(cfg)
  return spec


def without_unset_paths(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of cfg where the required paths still unset (unset_required_paths) read as
  none given: no checkpoint (""), no record files for that domain."""
  unset = unset_required_paths(cfg)
  if not unset:
    return cfg
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    for field in unset:
      section, name, *key = field.split(".")
      if key:
        del cfg[section][name][key[0]]
      else:
        cfg[section][name] = ""
  return cfg


def spec_of(cfg: ml_collections.ConfigDict) -> run_spec.RunSpec:
  """The RunSpec of cfg, unchecked (build checks first). Errors name the field. A real
  config's unset checkpoint and record files read as none given (without_unset_paths):
  the pod compile and the memory figures need neither."""
  cfg = without_unset_paths(cfg)
  fields = cfg.to_dict()
  return dataclasses.replace(run_spec.from_dict(run_spec.RunSpec, fields),
                             config_json=json.loads(cfg.to_json_best_effort()))


def build(cfg: ml_collections.ConfigDict) -> run_spec.RunSpec:
  """Checks cfg (validate_config: every error names the field) and translates it into the
  RunSpec that everything below `main` takes. The one place a ConfigDict is read."""
  return validate_config(cfg)


def validate_log(log: run_spec.LogSpec) -> None:
  """config.log beyond LogSpec's own checks: the wandb package, when wandb is on."""
  if log.wandb and log.wandb_mode != "disabled":
    import importlib.util
    # Checked here, or --dry_run passes and the run fails at its first log line.
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
      _fail("log.wandb", "needs the wandb package, which is not installed (pip install -e "
            "'.[wandb]', or leave log.wandb=False)", log.wandb)


def _check_dir_with(field: str, directory, required_file: str) -> None:
  if not isinstance(directory, str):
    _fail(field, "must be a directory path (a string)", directory)
  if not os.path.isdir(directory):
    _fail(field, "must be an existing directory", directory)
  if not os.path.isfile(os.path.join(directory, required_file)):
    _fail(field, f"must hold {required_file}", directory)


def _check_record_files(cfg, field: str, caps) -> None:
  """config.data.<field>: capability -> a path, comma-separated paths or globs, or a list."""
  from copd_jax.data import records as datasets
  files = cfg.data[field]
  if set(files) != set(caps):
    _fail(f"data.{field}", f"must give files for exactly config.tasks.capabilities {caps}",
          sorted(files))
  for cap, paths in files.items():
    if isinstance(paths, str) or (isinstance(paths, (list, tuple))
                                  and all(isinstance(p, str) for p in paths)):
      try:
        datasets.resolve_paths(paths)
      except (OSError, ValueError) as e:
        _fail(f"data.{field}.{cap}", f"must name existing JSONL/Parquet files or saved "
              f"datasets ({e})", paths)
    else:
      _fail(f"data.{field}.{cap}", "must be a path, comma-separated paths or a list of paths",
            paths)


# The path fields a real config leaves unset (default_config.required_path): None until
# given on the command line or by the tests.
REQUIRED_PATH_FIELDS = ("init.hf_checkpoint", "data.train_files", "data.eval_files")


def unset_required_paths(cfg) -> list[str]:
  """The dotted fields among REQUIRED_PATH_FIELDS (each entry of a files mapping) that are
  still unset (None), in that order."""
  out = []
  for field in REQUIRED_PATH_FIELDS:
    section, name = field.split(".")
    value = cfg[section].get(name, "")
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out += [f"{field}.{key}" for key, path in value.items() if path is None]
    elif value is None:
      out.append(field)
  return out


def check_required_paths(cfg) -> None:
  """A real config (configs/hf_*.py, configs/pod_4b*.py) names no checkpoint or record
  files of its own: each must be given. The error names the first field still unset."""
  unset = unset_required_paths(cfg)
  if unset:
    what = ("a local Hugging Face checkpoint directory" if unset[0] == "init.hf_checkpoint"
            else "record files (JSONL / Parquet / a saved dataset; comma-separated or a glob)")
    _fail(unset[0], f"is required: this config trains a real checkpoint on your data; set "
          f"--config.{unset[0]}=<{what}>" + (f" (also unset: {', '.join(unset[1:])})"
                                            if unset[1:] else ""), None)


def validate_records_and_init(cfg: ml_collections.ConfigDict) -> bool:
  """config.init.hf_checkpoint / hf_tokenizer and config.data.train_files / eval_files /
  shuffle_seed. Returns True when the run reads record files.

  Record files need a checkpoint (the toy base and ToyTokenizer only know the procedural
  suite), train and eval files for exactly config.tasks.capabilities, and existing files.
  With record files, capabilities may be any domain names ([a-z][a-z0-9_]*), e.g. 'math'.
  """
  checkpoint_dir = cfg.init.hf_checkpoint
  if checkpoint_dir:
    _check_dir_with("init.hf_checkpoint", checkpoint_dir, "config.json")
    tokenizer_dir = cfg.init.get("hf_tokenizer", "") or checkpoint_dir
    field = "init.hf_tokenizer" if cfg.init.get("hf_tokenizer", "") else "init.hf_checkpoint"
    _check_dir_with(field, tokenizer_dir, "tokenizer.json")
  columns = cfg.data.get("columns", {})
  from copd_jax.data import records as datasets
  for name, column in columns.items():
    if name not in datasets.RECORD_FIELDS:
      _fail("data.columns", f"maps {name!r}, which is not a record field "
            f"{datasets.RECORD_FIELDS}", dict(columns))
    if not isinstance(column, str) or not column:
      _fail(f"data.columns.{name}", "must be a column name (a non-empty string)", column)
  caps = tuple(cfg.tasks.capabilities)
  from copd_jax.data import sources as sources_lib
  if sources_lib.has_sources(cfg.data):
    if not checkpoint_dir:
      _fail("data.sources", "needs config.init.hf_checkpoint (a model and tokenizer for "
            "the records; the toy base only knows the procedural suite)", sorted(cfg.data.sources))
    _check_sources(sources_lib.all_sources(cfg.data), caps)
    _check_reader(cfg)
    return True
  if not cfg.data.train_files:
    if cfg.data.eval_files:
      _fail("data.eval_files", "needs config.data.train_files as well", dict(cfg.data.eval_files))
    return False
  if not checkpoint_dir:
    _fail("data.train_files", "needs config.init.hf_checkpoint (a model and tokenizer for "
          "the records; the toy base only knows the procedural suite)", dict(cfg.data.train_files))
  _check_record_files(cfg, "train_files", caps)
  _check_record_files(cfg, "eval_files", caps)
  _check_reader(cfg)
  return True


def _check_reader(cfg) -> None:
  from copd_jax.data import records as datasets
  if cfg.data.get("reader", "builtin") == "datasets":
    try:
      datasets.import_datasets()
    except ValueError as e:
      _fail("data.reader", str(e), cfg.data.reader)


def _check_sources(sources, caps) -> None:
  """config.data.sources: every source feeds a capability and names existing files; every
  capability has at least one train and one eval source."""
  from copd_jax.data import records as datasets
  for source in sources:
    if source.domain not in caps:
      _fail(f"data.sources.{source.name}.domain", f"must be one of config.tasks.capabilities "
            f"{caps}", source.domain)
    try:
      datasets.resolve_paths(source.paths)
    except (OSError, ValueError) as e:
      _fail(f"data.sources.{source.name}", f"must name existing JSONL/Parquet files or a "
            f"saved dataset ({e})", source.paths)
  for split in ("train", "eval"):
    missing = [c for c in caps if not any(s.domain == c and s.split == split for s in sources)]
    if missing:
      _fail("data.sources", f"has no {split!r} source for {missing} (every capability of "
            f"config.tasks.capabilities needs a train and an eval source)",
            sorted(s.name for s in sources))


def validate_mesh(cfg: ml_collections.ConfigDict) -> None:
  """Checks config.mesh (axes expert, data, fsdp, tensor; one may be -1): sizes, and that
  `expert` divides config.num_experts. A pod config (a `pod` section with num_chips) is
  checked against its slice's chip count, not this machine's devices; other configs are
  checked against the local devices when the mesh is built (sharding_lib.make_mesh)."""
  if "mesh" not in cfg:
    return
  from copd_jax import sharding as sharding_lib
  mesh = dict(cfg.mesh)
  pod = cfg.get("pod")
  if pod is not None:
    chips = _positive_int(pod, "num_chips", "pod.")
    topology = pod.get("topology", "")
    if topology:
      dims = [int(d) for d in str(topology).lower().split("x") if d.isdigit()]
      if not dims or len(dims) != len(str(topology).split("x")) or \
          int(__import__("math").prod(dims)) != chips:
        _fail("pod.topology", f"must be AxBxC chips multiplying to pod.num_chips={chips}",
              topology)
    sharding_lib.mesh_shape(mesh, chips, cfg.num_experts)
    return
  sharding_lib.check_mesh_config(mesh, cfg.num_experts)


def _wrap(field: str, build):
  """Builds a library object from a config node, renaming its errors to the field."""
  try:
    return build()
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.{field}: {e}") from None
