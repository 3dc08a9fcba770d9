"""How many bytes a run's buffers need, estimated from its config before anything is built.

An absurd size (`--config.rl.native_prompts=1000000000`, `model.d_model=1e9`,
`eval.num_examples=1e9`) must be one error line naming the field and the estimate, not a
numpy MemoryError after minutes, an XLA abort, or memory growing until the kernel kills
something. `check(cfg)` (called by config_lib.validate_config) raises MemoryBudgetError
when the estimate exceeds what the run can have:

* a run on this machine: host + device buffers together against this machine's physical
  memory (/proc/meminfo MemTotal, else os.sysconf): on CPU both live in host memory, and
  an accelerator run's host still holds every rollout, prompt and held-out set;
* a pod config (a `pod` section): the device buffers per chip against
  pod.hbm_bytes_per_chip (`device_bytes_per_chip` is deliberately simple: sharded state
  divided over the chips that hold one branch, no compiler temporaries).

The estimate is a lower bound of the big buffers (not of XLA's temporaries): it counts
parameters, optimizer state and gradients; one step's prompts, rollouts (tokens, masks,
log-probs), the sampler's KV cache and one hidden state per row; the diagnostic prompts;
the SFT batch with its dense logits; and the held-out sets (Python objects and frames).
A config over the budget is wrong by orders of magnitude, so a lower bound names it
without rejecting configs near the limit. The field named is the one whose reset to the
micro preset's value shrinks the estimate most.

`--dry_run` prints `describe(cfg)`.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable

import ml_collections

# Rough Python cost of one Example / prompt reference held in a list (object, strings).
EXAMPLE_OBJECT_BYTES = 1024
PROMPT_REF_BYTES = 100
GIB = 2 ** 30

# Fields the estimate grows with. A field not in the config is skipped.
SIZE_FIELDS = (
    "rl.native_prompts", "rl.cross_prompts", "rl.samples_per_prompt", "rl.diagnostic_prompts",
    "rl.eval_examples", "warm_start.batch_size", "eval.num_examples", "eval.batch_size",
    "eval.pass_samples", "data.max_prompt_len", "data.max_response_len", "model.vocab_size",
    "model.d_model", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.head_dim", "model.mlp_dim", "model.vision.image_size", "model.vision.num_frames",
    "model.vision.width", "model.vision.depth", "model.vision.mlp_dim", "num_experts")


class MemoryBudgetError(ValueError):
  """The config's buffers cannot fit the machine (or the pod's HBM)."""


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes of the run's big buffers: parts maps a name to (host bytes, device bytes)."""
  parts: dict

  @property
  def host(self) -> int:
    return sum(h for h, _ in self.parts.values())

  @property
  def device(self) -> int:
    return sum(d for _, d in self.parts.values())

  @property
  def total(self) -> int:
    return self.host + self.device

  def largest(self) -> str:
    return max(self.parts, key=lambda k: sum(self.parts[k]))


def human(n: int) -> str:
  """1536 -> '1.5 KiB' (exact for any integer size, however large)."""
  n = int(n)
  if n < 1024:
    return f"{n} B"
  for power, unit in ((6, "EiB"), (5, "PiB"), (4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
    if n >= 1024 ** power:
      whole = n // 1024 ** power
      if whole >= 10 ** 15:  # beyond float precision (and range): digits of the integer
        digits = str(whole)
        return f"{digits[0]}.{digits[1:4]}e+{len(digits) - 1} {unit}"
      return f"{n // 1024 ** (power - 1) / 1024:.1f} {unit}"
  return f"{n} B"


def machine_memory_bytes() -> int:
  """This machine's physical memory: /proc/meminfo MemTotal, else os.sysconf."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _int(node, key: str, default: int = 0) -> int:
  value = node.get(key, default) if hasattr(node, "get") else default
  try:
    return max(int(value), 0)
  except (TypeError, ValueError, OverflowError):
    return default


@dataclasses.dataclass(frozen=True)
class Dims:
  """The model sizes the estimate needs."""
  vocab: int
  d_model: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  mlp: int
  tied: bool
  compute_bytes: int           # 2 for bfloat16, 4 for float32
  frame_bytes: int             # one prompt's toy frames (0 without a toy vision tower)
  vision_params: int
  checkpoint_params: int = 0   # from safetensors file sizes, for a checkpoint run

  def params(self) -> int:
    if self.checkpoint_params:
      return self.checkpoint_params
    d, h, kv, hd = self.d_model, self.heads, self.kv_heads, self.head_dim
    layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * self.mlp + 2 * d + 2 * hd
    embed = self.vocab * d * (1 if self.tied else 2)
    return embed + self.layers * layer + d + self.vision_params


def _toy_dims(cfg) -> Dims:
  m = cfg.model
  v = m.get("vision", {})
  width, depth, vmlp = _int(v, "width"), _int(v, "depth"), _int(v, "mlp_dim")
  patch, channels, tubelet = _int(v, "patch_size", 1), _int(v, "channels", 3), _int(v, "tubelet", 1)
  tokens = (_int(v, "num_frames") // max(tubelet, 1)) * (_int(v, "image_size") // max(patch, 1)) ** 2
  d = _int(m, "d_model")
  # toy_vision.VisionEncoder: patch embedding, position table, ViT blocks, 2-layer merger.
  vision_params = (tubelet * patch * patch * channels + 1 + tokens) * width \
      + depth * (4 * width * width + 2 * width * vmlp + 9 * width + vmlp) \
      + 2 * width + width * d + d + d * d + d
  frames = _int(v, "num_frames") * _int(v, "image_size") ** 2 * 3 * 4
  return Dims(vocab=_int(m, "vocab_size"), d_model=_int(m, "d_model"),
              layers=_int(m, "num_layers"), heads=_int(m, "num_heads"),
              kv_heads=_int(m, "num_kv_heads"), head_dim=_int(m, "head_dim"),
              mlp=_int(m, "mlp_dim"), tied=bool(m.get("tie_embeddings", True)),
              compute_bytes=2 if m.get("dtype") == "bfloat16" else 4, frame_bytes=frames,
              vision_params=vision_params)


def _checkpoint_dims(cfg) -> Dims:
  """Sizes of config.init.hf_checkpoint: parameters from the safetensors file sizes (f32
  in memory: twice a bf16 file), the rest from config.json (text_config for Qwen3-VL).
  Unreadable values count 0: the importer names them (this is only an estimate)."""
  directory = cfg.init.hf_checkpoint
  try:
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, ValueError, RecursionError):
    raw = {}
  text = raw.get("text_config", raw) if isinstance(raw, dict) else {}
  text = text if isinstance(text, dict) else {}
  file_bytes = sum(os.path.getsize(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
  d, heads = _int(text, "hidden_size"), _int(text, "num_attention_heads")
  return Dims(vocab=_int(text, "vocab_size"), d_model=d, layers=_int(text, "num_hidden_layers"),
              heads=heads, kv_heads=_int(text, "num_key_value_heads", heads),
              head_dim=_int(text, "head_dim", d // max(heads, 1)),
              mlp=_int(text, "intermediate_size"),
              tied=bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings", True))
                        if isinstance(raw, dict) else True),
              compute_bytes=2 if cfg.model.get("dtype") == "bfloat16" else 4, frame_bytes=0,
              vision_params=0, checkpoint_params=max(file_bytes * 2 // 4, 1))


def _record_count_bound(cfg, field: str, caps) -> int | None:
  """An upper bound of the records in config.data.<field> (a record takes >= 8 bytes of
  file), or None without record files."""
  files = cfg.data.get(field, {}) if "data" in cfg else {}
  if not files:
    return None
  total = 0
  for cap in caps:
    paths = files.get(cap, "")
    for p in (paths.split(",") if isinstance(paths, str) else list(paths)):
      for match in glob.glob(str(p).strip()):
        for root, _, names in (os.walk(match) if os.path.isdir(match) else [("", [], [match])]):
          total += sum(os.path.getsize(os.path.join(root, n)) for n in names
                       if os.path.isfile(os.path.join(root, n)))
  return total // 8


def estimate(cfg: ml_collections.ConfigDict) -> Estimate:
  """The bytes of the run's big host and device buffers (a lower bound; see the module
  docstring). Pure arithmetic on the config (and file sizes for a checkpoint run)."""
  dims = _checkpoint_dims(cfg) if cfg.init.get("hf_checkpoint", "") else _toy_dims(cfg)
  caps = tuple(cfg.tasks.capabilities)
  seq = _int(cfg.data, "max_prompt_len") + _int(cfg.data, "max_response_len")
  prompt_len = _int(cfg.data, "max_prompt_len")
  cb = dims.compute_bytes
  param_bytes = dims.params() * 4  # parameters are float32
  kv_per_token = dims.layers * 2 * dims.kv_heads * dims.head_dim * cb
  per_prompt_host = PROMPT_REF_BYTES + prompt_len * 5 + dims.frame_bytes
  per_row_host = seq * (4 + 1 + 4 + 4 + 4)  # tokens, mask, old / teacher log-probs, loss mask
  # Activations of one row: one hidden state, the KV cache while sampling, the vocabulary
  # logits of the newest token.
  per_row_device = seq * (4 + 1 + 4 * 3) + seq * dims.d_model * cb + seq * kv_per_token \
      + dims.vocab * 4
  parts = {}
  is_rl = cfg.method != "base" and "rl" in cfg
  experts = _int(cfg, "num_experts", 1) or 1
  if is_rl:
    # E branches: parameters, Adam's two moments and one gradient each; plus the base.
    parts["parameters and optimizer state"] = (0, param_bytes * (4 * experts + 1))
  else:
    parts["parameters"] = (0, param_bytes)
  if not cfg.init.get("hf_checkpoint", "") and _int(cfg.warm_start, "steps"):
    b = _int(cfg.warm_start, "batch_size")
    parts["warm-start (SFT) state and batch"] = (
        b * (EXAMPLE_OBJECT_BYTES + dims.frame_bytes + seq * 9),
        param_bytes * 4 + b * (seq * dims.d_model * cb + seq * dims.vocab * 4))
  if is_rl:
    rl = cfg.rl
    prompts = experts * (_int(rl, "native_prompts") + _int(rl, "cross_prompts"))
    rows = prompts * _int(rl, "samples_per_prompt")
    parts["rollouts of one step"] = (prompts * per_prompt_host + rows * per_row_host,
                                     prompts * dims.frame_bytes + rows * per_row_device)
    diag = experts * _int(rl, "diagnostic_prompts")
    parts["diagnostic rollouts"] = (diag * (per_prompt_host + per_row_host),
                                    diag * (per_row_device + seq * dims.d_model * 4 * experts))
  per_example = EXAMPLE_OBJECT_BYTES + prompt_len * 5 + dims.frame_bytes
  examples = _int(cfg.eval, "num_examples")
  bound = _record_count_bound(cfg, "eval_files", caps)
  held = len(caps) * (examples if bound is None else min(examples, bound))
  batch = _int(cfg.eval, "batch_size") * max(_int(cfg.eval, "pass_samples"), 1)
  parts["held-out sets and an eval batch"] = (held * per_example + batch * per_row_host,
                                              batch * per_row_device)
  return Estimate(parts)


def _with(cfg, field: str, value) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(cfg.to_dict())  # unlocked copy
  node = out
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  return out


def _get(cfg, field: str):
  node = cfg
  for part in field.split("."):
    if not hasattr(node, "get") or part not in node:
      return None
    node = node[part]
  return node


def culprit(cfg: ml_collections.ConfigDict, measure: Callable[[Estimate], float]) -> str | None:
  """The size field whose reset to the micro preset's value shrinks measure(estimate) most
  (None when no reset helps)."""
  from copd_jax import default_config
  method = cfg.method if cfg.method in default_config.METHODS else "copd"
  reference = default_config.get(method, "micro")
  base = measure(estimate(cfg))
  best, best_saving = None, 0
  for field in SIZE_FIELDS:
    value, small = _get(cfg, field), _get(reference, field)
    if value is None or small is None or value == small:
      continue
    saving = base - measure(estimate(_with(cfg, field, small)))
    if saving > best_saving:
      best, best_saving = field, saving
  return best


def device_bytes_per_chip(cfg: ml_collections.ConfigDict, est: Estimate) -> int:
  """A pod config's device bytes per chip: everything sharded evenly over the slice
  (config.pod.num_chips). Simple on purpose; a compile-based figure is more exact."""
  return est.device // max(_int(cfg.pod, "num_chips", 1), 1)


def _limit(cfg) -> tuple[Callable[[Estimate], float], int | None, str]:
  """(what is measured, its budget, a description of the budget). A pod config without
  pod.hbm_bytes_per_chip has no budget (None): it runs on other machines than this one."""
  pod = cfg.get("pod")
  if pod is not None:
    hbm = _int(pod, "hbm_bytes_per_chip")
    if not hbm:
      return (lambda e: device_bytes_per_chip(cfg, e), None,
              "no budget (config.pod.hbm_bytes_per_chip is not set)")
    return (lambda e: device_bytes_per_chip(cfg, e), hbm,
            f"{human(hbm)} of HBM per chip (config.pod.hbm_bytes_per_chip)")
  ram = machine_memory_bytes()
  return (lambda e: e.total, ram, f"this machine's {human(ram)} of memory")


def check(cfg: ml_collections.ConfigDict) -> Estimate:
  """Raises MemoryBudgetError (one line naming the field and the estimate) when the run
  cannot fit; returns the estimate otherwise."""
  est = estimate(cfg)
  measure, budget, where = _limit(cfg)
  if budget is None:
    return est
  need = measure(est)
  if need > budget:
    field = culprit(cfg, measure)
    name = f"config.{field}={_get(cfg, field)!r}" if field else "config"
    raise MemoryBudgetError(
        f"{name}: the run needs about {human(need)} ({need} bytes; largest part: "
        f"{est.largest()}), more than {where}; lower it")
  return est


def describe(cfg: ml_collections.ConfigDict) -> str:
  """One line for --dry_run: the estimate, its largest part and the budget."""
  est = estimate(cfg)
  measure, budget, where = _limit(cfg)
  parts = ", ".join(f"{k} {human(sum(v))}" for k, v in
                    sorted(est.parts.items(), key=lambda kv: -sum(kv[1])))
  return (f"memory estimate: {human(measure(est))} against {where} (host {human(est.host)}, "
          f"device {human(est.device)}: {parts})")
