"""Deviceless TPU compilation of every program a run executes, with the TPU compiler's
own memory and cost figures (no TPU needed: libtpu compiles for an abstract topology).

    report = compile_run(cfg, "v5p:4x4x12")          # {program: figures}

Programs (abstract_programs), each built with the run's own builders so what is
compiled here is what training compiles:
  sampler         sampling.sampler_program: prefill of every prompt, then the decode
                  loop (one compiled program, as collect_rollouts runs it);
  teacher_scoring rl.scoring.score_by_teachers under the run's regroup placement (the part
                  of the OPD update that scores each cross row under its teacher, compiled
                  alone to show its share);
  rl_update       rl.update.update_program on an RL step's rows (native prompts only);
  opd_update      the same on an OPD step's rows (native + cross prompts, live teachers);
  merge           models.stacked.merge (rl.loop.merged_params) of the branches into one.

Figures per program (program_figures), per device: arguments, outputs and temporaries
from compiled.memory_analysis() against the chip's HBM; FLOPs and bytes accessed from
compiled.cost_analysis() (the SPMD-partitioned program, so also per device; a while
loop's body counts once, so the sampler's figures are prefill + about one decode step);
a roofline time max(FLOPs / peak, bytes / bandwidth) from CHIPS; the compile time.

What this cannot tell: speed on a real chip (the roofline is a lower bound that ignores
collectives and latency) and numerics (nothing runs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax import sampling as sampling_lib
from copd_jax.models import lora, model_config, stacked
from copd_jax.models.policy import policy_of
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig
from copd_jax.rl import rows as rows_lib, schedules, scoring, stages, update as update_lib
from copd_jax.run_spec import MeshSpec, RunSpec, replace_fields
from copd_jax.sharding import MeshProgram, RunSharding, make_mesh

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's public peak figures."""
  generation: str
  peak_bf16_flops: float  # FLOP/s per chip, dense bf16
  hbm_bandwidth: float  # bytes/s per chip
  hbm_bytes: int  # bytes per chip


# Google Cloud TPU documentation, "key specifications" table of each generation. The pages
# write HBM capacity as "GB"; it is binary (GiB), as the v4 page spells it.
CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, HBM2 32 GiB, 1200 GBps.
    "v4": Chip("v4", 275e12, 1200e9, 32 * GiB),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, HBM2 16 GB, 819 GBps.
    "v5e": Chip("v5e", 197e12, 819e9, 16 * GiB),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, HBM2e 95 GB, 2765 GBps.
    "v5p": Chip("v5p", 459e12, 2765e9, 95 * GiB),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, HBM 32 GB, 1640 GBps.
    "v6e": Chip("v6e", 918e12, 1640e9, 32 * GiB),
}

PROGRAMS = ("sampler", "teacher_scoring", "rl_update", "opd_update", "merge")


def chip_of(topology: str) -> Chip:
  """The Chip of a topology name such as 'v5p:4x4x12' or 'v5e:2x2'."""
  generation = topology.split(":")[0].strip().lower()
  if generation in ("v5litepod", "v5lite"):
    generation = "v5e"
  if generation not in CHIPS:
    raise ValueError(f"topology {topology!r}: unknown TPU generation {generation!r}; "
                     f"known: {sorted(CHIPS)} (e.g. 'v5p:2x2x1', 'v5e:4x4')")
  return CHIPS[generation]


def chips_in(topology: str) -> int:
  """Chips of a topology name: 'v5p:4x4x12' -> 192."""
  try:
    return math.prod(int(n) for n in topology.split(":")[1].lower().split("x"))
  except (IndexError, ValueError):
    raise ValueError(f"topology {topology!r} must look like 'v5p:4x4x12' or 'v5e:2x2'") from None


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> float:
  """The time one chip needs at least: compute-bound or memory-bound, whichever is slower."""
  return max(flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bandwidth)


def tpu_devices(topology: str) -> list:
  """The abstract devices of a TPU topology (no TPU needed; libtpu must be installed)."""
  from jax.experimental import topologies
  # libtpu takes a machine-wide lock on load, meant for processes sharing real chips;
  # deviceless compiles share none, so several may run at once (tests, other tools).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  chip_of(topology)  # a clear error for an unknown generation
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as err:  # libtpu missing or the shape unknown to it
    raise ValueError(f"cannot describe TPU topology {topology!r} ({err}); is libtpu "
                     "installed (pip install 'jax[tpu]')?") from err


@contextlib.contextmanager
def tracing_for_tpu():
  """Within: jax.default_backend() answers 'tpu'. The trace-time choices of the model and
  the kernels (splash attention for attention_kernel='auto', the Pallas loss's platform
  check) ask it, and on this CPU host it says 'cpu' although the program is compiled for
  a TPU topology. Restored on exit."""
  original = jax.default_backend
  jax.default_backend = lambda: "tpu"
  try:
    yield
  finally:
    jax.default_backend = original


# --------------------------------------------------------------------------- model and shapes


def run_model_config(cfg, num_layers: int | None = None):
  """The policy's model config of a run config, built without weights: the Qwen3VLConfig
  of config.init.hf_checkpoint's config.json when that is a Qwen3-VL checkpoint, else of
  config.pod.qwen3_vl (a Hugging Face config.json as a dict: pod configs carry the
  architecture, so no checkpoint need be on disk), else the toy ModelConfig of
  config.model. Execution settings (remat, attention) come from config.model.

  num_layers: override the decoder's depth (cheap compiles). Qwen3-VL's deepstack
  features go into the first layers, so with fewer decoder layers than deepstack indexes
  only the first num_layers indexes are kept."""
  from copd_jax import policy_setup
  arch = cfg.pod.qwen3_vl if cfg.pod is not None else None
  checkpoint = cfg.init.hf_checkpoint
  if checkpoint and policy_setup.is_qwen3_vl_checkpoint(checkpoint):
    model = policy_setup.vl_model_config(cfg)
  elif arch:
    arch = dict(arch)
    try:
      model = Qwen3VLConfig.from_hf(arch, dtype=cfg.model.dtype)
    except ValueError as err:
      raise ValueError(f"config.pod.qwen3_vl: {err}") from err
    model = dataclasses.replace(model, text=policy_setup.with_execution_settings(model.text, cfg))
  else:
    if num_layers is not None:
      return dataclasses.replace(cfg.model, num_layers=int(num_layers))
    return cfg.model
  if num_layers is not None:
    keep = tuple(model.vision.deepstack_visual_indexes[:int(num_layers)])
    model = dataclasses.replace(
        model, text=dataclasses.replace(model.text, num_layers=int(num_layers)),
        vision=dataclasses.replace(model.vision, deepstack_visual_indexes=keep))
  return model


def text_config(model_cfg) -> model_config.ModelConfig:
  return policy_of(model_cfg).text


def abstract_params(model_cfg, num_branches: int, lora_spec: lora.LoraSpec | None = None):
  """Stacked [S, ...] parameter shapes of the policy, or with a LoRA spec of rank > 0
  one base and S adapters (lora.LoraBranches); nothing allocated."""
  from copd_jax import policy_setup
  if lora_spec is not None and lora_spec.enabled:
    return jax.eval_shape(
        lambda k: stacked.initial_branches(policy_setup.init_policy_params(model_cfg, k),
                                           num_branches, lora_spec, k), jax.random.key(0))
  return jax.eval_shape(
      lambda keys: jax.vmap(lambda k: policy_setup.init_policy_params(model_cfg, k))(keys),
      jax.random.split(jax.random.key(0), num_branches))


def _media(model_cfg, cfg, lead: tuple[int, ...], prompt_len: int):
  """Abstract prompt media [*lead, ...]: the toy's frames, or Qwen3-VL's PromptMedia padded
  to config.data.vision_budget patches per prompt (Policy.abstract_media)."""
  return policy_of(model_cfg).abstract_media(lead, prompt_len, int(cfg.data.vision_budget))


def abstract_rows(model_cfg, cfg, num_branches: int, rows: int) -> rows_lib.Rows:
  """Training rows [S, R, P + R_new] of one step (rollout.build_rows' layout, prompt_len
  P = data.max_prompt_len)."""
  sds = jax.ShapeDtypeStruct
  s, t = num_branches, cfg.data.max_prompt_len + cfg.data.max_response_len
  f32, i32 = jnp.float32, jnp.int32
  return rows_lib.Rows(
      tokens=sds((s, rows, t), i32), positions=sds((s, rows, t), i32),
      token_mask=sds((s, rows, t), jnp.bool_), response_mask=sds((s, rows, t), f32),
      old_logprobs=sds((s, rows, t), f32), advantages=sds((s, rows), f32),
      opd_beta=sds((s, rows), f32),
      frames=_media(model_cfg, cfg, (s, rows), cfg.data.max_prompt_len),
      prompt_len=int(cfg.data.max_prompt_len))


def sampling_config(cfg, model_cfg) -> sampling_lib.SamplingConfig:
  """The run's SamplingConfig (rl.loop.data_context); stop / banned ids only change
  constants of the program: the end-of-turn id, and for Qwen3-VL its media pad ids."""
  text = text_config(model_cfg)
  banned = policy_of(model_cfg).media_token_ids
  stop = (min(2, text.vocab_size - 1),)
  if banned:  # a stop id clear of the media pads
    stop = (max(set(range(text.vocab_size - 3, text.vocab_size)) - set(banned)),)
  s = cfg.sampling
  return sampling_lib.SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                     top_k=s.top_k, top_p=s.top_p, stop_token_ids=stop,
                                     banned_token_ids=banned)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      tree, shardings)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of abstract arrays with shardings (the largest shard)."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return int(total)


@dataclasses.dataclass
class Program:
  """A compilable program: fn.lower(*args) (a sharding.MeshProgram or a jax.jit); shared_bytes:
  per-device argument bytes that are the same buffers as another argument at run time
  (live teachers are the students' own params), counted once in per_device_bytes."""
  name: str
  fn: Any
  args: tuple
  shared_bytes: int = 0


def _score_on_mesh(fn: update_lib.UpdateFn, teachers: scoring.Teachers, rows):
  return scoring.score_by_teachers(teachers, rows, fn.ucfg.with_constraint(fn.run.constrain_rows),
                                   fn.run.regroup_placement())


def _scoring_program(fn: update_lib.UpdateFn):
  """score_by_teachers as a program on fn.run's mesh, as the update runs it (same placement
  and activation constraint): program(teachers, rows) -> f32[S, R, W]."""
  run = fn.run

  def shardings(args):
    teachers, rows = args
    s, r = rows.tokens.shape[:2]
    width = rows.tokens.shape[2] - rows.prompt_len
    teachers_sh = teachers.replace(params=run.stacked_params(teachers.params),
                                   routing=run.replicated)
    return ((teachers_sh, run.rows(rows)), run.per_branch((s, r, width), 1))
  return MeshProgram(_score_on_mesh, (fn,), run.mesh, shardings)


def merge_program(run: RunSharding, params, weights=None):
  """stacked.merge (what rl.loop.merged_params runs) jitted with the run's shardings:
  stacked params in, one policy's params out."""
  single = jax.eval_shape(lambda p: stacked.merge(p, weights), params)
  return jax.jit(lambda p: stacked.merge(p, weights),
                 in_shardings=(run.stacked_params(params),),
                 out_shardings=run.stacked_params(single, stacked=False))


def abstract_programs(cfg, run: RunSharding, num_layers: int | None = None,
                      names=PROGRAMS) -> list[Program]:
  """The programs `names` (of PROGRAMS) of a run config on run's mesh with abstract,
  sharded arguments (nothing allocated). An OPD step carries rl.native_prompts +
  rl.cross_prompts prompts per branch, an RL step the native ones; G rollouts each;
  rows of data.max_prompt_len + data.max_response_len tokens; live teachers on the OPD
  step, routed by rl.opd.topology (hub = rl.opd.hub)."""
  unknown = sorted(set(names) - set(PROGRAMS))
  if unknown:
    raise ValueError(f"unknown programs {unknown}; known: {PROGRAMS}")
  model_cfg = run_model_config(cfg, num_layers)
  # Parameter shardings come from the layers' declarations of this (possibly shrunken) model.
  from copd_jax import policy_setup
  run = dataclasses.replace(run, param_axes=policy_setup.declared_param_axes(model_cfg))
  ucfg = rows_lib.update_config(cfg, model_cfg)
  rl, s = cfg.rl, cfg.num_experts
  caps = tuple(rl.capabilities)
  g, p = rl.samples_per_prompt, cfg.data.max_prompt_len
  native, cross = rl.native_prompts, rl.cross_prompts
  stage = stages.copd_stage(rl, caps)
  update_fn = update_lib.UpdateFn(run, ucfg, update_lib.optimizer_for_stage(rl, stage.steps))
  topology = rl.opd.topology if rl.opd.topology != "none" else "full"
  hub = caps.index(rl.opd.hub) if topology == "hub" else 0
  stage = dataclasses.replace(stage, topology=schedules.topology_matrix(s, topology, hub=hub),
                              native_prompts=native, cross_prompts=cross)
  routing = stages.teacher_routing(stages.cross_teacher_assignment(stage), s, g,
                                   native_rows=native * g)
  routing_args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                             sharding=run.replicated),
                              routing.as_tree())
  params = abstract_params(model_cfg, s, cfg.lora)
  a_params = _with_shardings(params, run.stacked_params(params))
  opt_state = jax.eval_shape(
      lambda q: update_lib.init_optimizer_state(update_fn.optimizer, q), params)
  a_state = update_lib.TrainState(a_params, _with_shardings(opt_state, run.opt_state(opt_state)))
  a_teachers = scoring.Teachers(a_params, routing_args, native * g)
  ref = None
  if ucfg.loss.kl_coef > 0:  # the frozen base: one unstacked policy
    single = (params.base if lora.is_lora(params) else  # LoRA: the shared base itself
              jax.eval_shape(lambda q: jax.tree.map(lambda x: x[0], q), params))
    ref = _with_shardings(single, run.stacked_params(single, stacked=False))

  def rows_of(prompts):
    r = abstract_rows(model_cfg, cfg, s, prompts * g)
    return _with_shardings(r, run.rows(r))

  out = []
  for name in names:
    if name == "sampler":
      sampling_cfg = sampling_config(cfg, model_cfg)
      b = native + cross
      tokens = jax.ShapeDtypeStruct((s, b, p), jnp.int32)
      mask = jax.ShapeDtypeStruct((s, b, p), jnp.bool_)
      media = _media(model_cfg, cfg, (s, b), p)
      key_data = jax.ShapeDtypeStruct((s, 2), jnp.uint32)
      fn = sampling_lib.sampler_program(run, sampling_lib.Sampler(model_cfg, sampling_cfg, g))
      # The input shardings sampler_program declares: prompts (and media) expert x batch.
      def shard(x, batch_dims=1):
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=run.per_branch(x.shape, batch_dims))
      prompts = sampling_lib.Prompts(shard(tokens), shard(mask), jax.tree.map(shard, media))
      out.append(Program(name, fn, (a_params, prompts, shard(key_data, 0))))
    elif name == "teacher_scoring":
      fn = _scoring_program(update_fn)
      out.append(Program(name, fn, (a_teachers, rows_of(native + cross))))
    elif name == "rl_update":
      fn = update_lib.update_program(update_fn)
      out.append(Program(name, fn, (a_state, rows_of(native), None, ref)))
    elif name == "opd_update":
      fn = update_lib.update_program(update_fn)
      out.append(Program(name, fn, (a_state, rows_of(native + cross), a_teachers, ref),
                         shared_bytes=per_device_bytes(a_params)))
    elif name == "merge":
      weights = None
      if rl.merge_weights:
        weights = [rl.merge_weights.get(c, 0.0) for c in caps]
      out.append(Program(name, merge_program(run, params, weights), (a_params,)))
  return out


# --------------------------------------------------------------------------- compile


def memory_figures(compiled) -> dict:
  """Per-device bytes from compiled.memory_analysis(): arguments, outputs, temporaries,
  aliased (counted once), generated code."""
  ma = compiled.memory_analysis()
  get = lambda name: int(getattr(ma, name, 0) or 0)  # noqa: E731
  return {"argument_bytes": get("argument_size_in_bytes"),
          "output_bytes": get("output_size_in_bytes"),
          "temp_bytes": get("temp_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes"),
          "generated_code_bytes": get("generated_code_size_in_bytes")}


def cost_figures(compiled) -> dict:
  """FLOPs and bytes accessed from compiled.cost_analysis() (per device)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def program_figures(memory: dict, cost: dict, chip: Chip, compile_s: float,
                    shared_bytes: int = 0) -> dict:
  """The report of one compiled program. per_device_bytes = arguments + outputs +
  temporaries - aliased - shared (arguments that are another argument's buffers)."""
  total = (memory["argument_bytes"] + memory["output_bytes"] + memory["temp_bytes"]
           - memory["alias_bytes"] - shared_bytes)
  return dict(memory, shared_argument_bytes=int(shared_bytes), per_device_bytes=int(total),
              hbm_bytes_per_chip=int(chip.hbm_bytes),
              hbm_fraction=round(total / chip.hbm_bytes, 4),
              flops=cost["flops"], bytes_accessed=cost["bytes_accessed"],
              roofline_s=roofline_seconds(cost["flops"], cost["bytes_accessed"], chip),
              compile_s=round(compile_s, 2))


def compile_program(program: Program, chip: Chip, mesh) -> dict:
  """Lowers and compiles one program for TPU; returns program_figures. mesh: the run's
  mesh, set while tracing (jax.set_mesh) so the Pallas kernels pick the tiles of the
  generation its devices are (copd_jax.kernels.tpu_tiles), as on a real chip."""
  t0 = time.perf_counter()
  with tracing_for_tpu(), jax.set_mesh(mesh):
    compiled = program.fn.lower(*program.args).compile()
  return program_figures(memory_figures(compiled), cost_figures(compiled), chip,
                         time.perf_counter() - t0, program.shared_bytes)


def run_sharding(cfg, topology: str) -> RunSharding:
  """config.mesh over the abstract devices of `topology`: all of them, or the first N when
  the mesh sizes are fixed and multiply to fewer (e.g. a one-chip mesh on a 2x2 slice)."""
  devices = tpu_devices(topology)
  sizes = cfg.mesh.sizes()
  wanted = math.prod(sizes.values()) if all(v > 0 for v in sizes.values()) else len(devices)
  if wanted < len(devices):
    devices = devices[:wanted]
  from copd_jax import policy_setup
  return RunSharding(make_mesh(sizes, devices, cfg.num_experts),
                     param_axes=policy_setup.declared_param_axes(run_model_config(cfg)))


def compile_run(cfg, topology: str, num_layers: int | None = None, names=PROGRAMS,
                log: Callable[[str], None] = lambda line: None) -> dict:
  """{program: program_figures} of a run config compiled for `topology`, or
  {program: {"error": ...}} for a program the compiler refused (the others still run)."""
  chip = chip_of(topology)
  run = run_sharding(cfg, topology)
  out = {}
  for program in abstract_programs(cfg, run, num_layers, names):
    log(f"compiling {program.name} for {topology} ...")
    try:
      out[program.name] = compile_program(program, chip, run.mesh)
    except Exception as err:  # report it and go on: one refusal must not hide the rest
      out[program.name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
    log(f"  {program.name}: " + format_figures(out[program.name]))
  return out


def format_figures(fig: dict) -> str:
  if "error" in fig:
    return "FAILED " + fig["error"].splitlines()[0][:300]
  return (f"{fig['per_device_bytes'] / GiB:.2f} GiB per device "
          f"({fig['hbm_fraction']:.1%} of {fig['hbm_bytes_per_chip'] / GiB:.0f} GiB HBM; "
          f"args {fig['argument_bytes'] / GiB:.2f}, out {fig['output_bytes'] / GiB:.2f}, "
          f"temp {fig['temp_bytes'] / GiB:.2f}, shared -{fig['shared_argument_bytes'] / GiB:.2f}),"
          f" {fig['flops']:.3g} FLOP, {fig['bytes_accessed']:.3g} B accessed, "
          f"roofline {fig['roofline_s'] * 1e3:.2f} ms, compiled in {fig['compile_s']:.1f} s")


# --------------------------------------------------------------------------- a small run

SMALL_QWEN3_VL = dict(
    model_type="qwen3_vl", tie_word_embeddings=True, image_token_id=2000, video_token_id=2001,
    vision_start_token_id=2002, vision_end_token_id=2003,
    text_config=dict(vocab_size=2048, hidden_size=256, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     intermediate_size=512, rope_theta=10000.0,
                     rope_scaling=dict(mrope_section=[12, 10, 10])),
    vision_config=dict(depth=1, hidden_size=128, intermediate_size=256, num_heads=2,
                       out_hidden_size=256, num_position_embeddings=64,
                       deepstack_visual_indexes=[0]))
SMALL_TOPOLOGY = "v5p:2x2x1"


def small_config(cfg: RunSpec, chips: int = 4) -> RunSpec:
  """A copy of a RunSpec shrunk to compile in seconds on SMALL_TOPOLOGY: on its 4 chips
  (mesh fsdp=2 x tensor=2) or, chips=1, on one of them: tiny widths, one decoder layer (a
  tiny Qwen3-VL with a one-block vision tower when
  the config carries config.pod.qwen3_vl), 128 + 128 tokens, 2 native + 2 cross prompts
  x 2 samples, micro-batches of 4 rows. The model family, the loss backend and tiles,
  the attention kernel, remat and the optimizer are the config's own."""
  if chips not in (1, 4):
    raise ValueError(f"small_config: chips must be 1 or 4, got {chips}")
  split = 2 if chips == 4 else 1
  changes = {"init.hf_checkpoint": "", "model.vocab_size": 2048, "model.d_model": 256,
             "model.num_layers": 1, "model.num_heads": 4, "model.num_kv_heads": 2,
             "model.head_dim": 64, "model.mlp_dim": 512, "data.max_prompt_len": 128,
             "data.max_response_len": 128, "data.vision_budget": 64,
             "sampling.max_new_tokens": 128, "rl.native_prompts": 2, "rl.cross_prompts": 2,
             "rl.samples_per_prompt": 2, "rl.micro_batch_rows": 4,
             "mesh": MeshSpec(expert=1, data=1, fsdp=split, tensor=split)}
  if cfg.pod is not None:
    changes.update({"pod.tpu": "v5p", "pod.topology": "2x2x1", "pod.num_chips": 4})
    if cfg.pod.qwen3_vl:
      changes["pod.qwen3_vl"] = SMALL_QWEN3_VL
  return replace_fields(cfg, changes)


def figures_table(records: list[dict]) -> str:
  """A markdown table (one line per config and program) from compile_tpu.py --out records."""
  lines = ["| config | topology | mesh | layers | program | per device | HBM fraction | "
           "temporaries | TFLOP | roofline | compile |", "|---" * 11 + "|"]
  for rec in records:
    mesh = " x ".join(f"{k}={v}" for k, v in rec.get("mesh", {}).items() if v != 1) or "1"
    name = rec["config"].split("/")[-1].removesuffix(".py")
    overrides = sorted(rec.get("overrides", []))
    if overrides == ["model.attention_kernel=xla", "rl.kernel.backend=chunked"]:
      name += " portable"
    elif overrides:
      name += " (" + ", ".join(o.split(".")[-1] for o in overrides) + ")"
    for program, fig in rec.get("programs", {}).items():
      head = f"| {name} | {rec['topology']} | {mesh} | {rec['num_layers']} | {program} |"
      if "error" in fig:
        message = fig["error"].splitlines()[0].split(": ", 1)[-1]
        oom = re.search(r"temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", message)
        if oom:
          message = f"out of HBM, temporaries {oom.group(1)} > {oom.group(2)}"
        lines.append(head + f" does not compile: {message[:60]} | | | | | |")
        continue
      lines.append(head + f" {fig['per_device_bytes'] / GiB:.2f} GiB | {fig['hbm_fraction']:.3f} |"
                   f" {fig['temp_bytes'] / GiB:.2f} GiB | {fig['flops'] / 1e12:.2f} |"
                   f" {fig['roofline_s'] * 1e3:.1f} ms | {fig['compile_s']:.0f} s |")
  return "\n".join(lines)
