"""Abstract (allocation-free) lowering of the sharded update, for memory and collective audits."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.experimental.mesh_utils
import jax.numpy as jnp
import numpy as np

from copd_jax.models import model_config, stacked
from copd_jax.rl import rows as rows_lib, schedules, stages, update as update_lib
from copd_jax.sharding import RunSharding


def tree_bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      tree, shardings)


def abstract_opd_update(cfg, run: RunSharding, num_layers: int | None = None,
                        native_prompts: int | None = None, cross_prompts: int | None = None,
                        topology: str | None = None):
  """The CoPD OPD-step update of a run config as (ShardedFunction, abstract args): params,
  optimizer state and rows are jax.ShapeDtypeStruct with their shardings; nothing is
  allocated. Lower/compile with `fn.lower(*args).compile()`.

  num_layers / native_prompts / cross_prompts / topology ('hub' or 'full') override the
  config (cheap test lowering, traffic of another topology). Micro-batching:
  rl.micro_batch_rows (0 when absent).
  Rows: [S, (native + cross) * G, max_prompt_len + max_response_len]; routing: the live
  teachers' topology (hub = rl.opd.hub), as CoPD uses it.
  """
  model_fields = cfg.model.to_dict()
  if num_layers is not None:
    model_fields["num_layers"] = int(num_layers)
  model_cfg = model_config.ModelConfig.from_dict(model_fields)
  rl = cfg.rl
  # The run's own builders, so this lowering cannot drift from what training compiles.
  ucfg = rows_lib.update_config(cfg, model_cfg)
  s = cfg.num_experts
  caps = tuple(rl.capabilities)
  stage = stages.copd_stage(rl, caps)
  optimizer = update_lib.optimizer_for_stage(rl, stage.steps)
  topology = topology or rl.opd.topology
  hub = caps.index(rl.opd.hub) if topology == "hub" else 0
  native = rl.native_prompts if native_prompts is None else native_prompts
  cross = rl.cross_prompts if cross_prompts is None else cross_prompts
  g = rl.samples_per_prompt
  stage = dataclasses.replace(stage, topology=schedules.topology_matrix(s, topology, hub=hub),
                              native_prompts=native, cross_prompts=cross)
  routing = stages.teacher_routing(stages.cross_teacher_assignment(stage), s, g,
                                    native_rows=native * g)
  params = jax.eval_shape(lambda k: stacked.init_stacked(model_cfg, k),
                          jax.random.split(jax.random.key(0), s))
  opt_state = jax.eval_shape(lambda p: update_lib.init_optimizer_state(optimizer, p), params)
  r = (native + cross) * g
  t = cfg.data.max_prompt_len + cfg.data.max_response_len
  v = model_cfg.vision
  f32, i32 = jnp.float32, jnp.int32
  sds = jax.ShapeDtypeStruct
  rows = rows_lib.Rows(tokens=sds((s, r, t), i32), positions=sds((s, r, t), i32),
                      token_mask=sds((s, r, t), jnp.bool_), response_mask=sds((s, r, t), f32),
                      old_logprobs=sds((s, r, t), f32), advantages=sds((s, r), f32),
                      opd_beta=sds((s, r), f32),
                      frames=sds((s, r, v.num_frames, v.image_size, v.image_size, v.channels), f32))
  routing_arrays = {k: sds(np.shape(x), np.asarray(x).dtype, sharding=run.replicated)
                    for k, x in dataclasses.asdict(routing).items()}
  fn = update_lib.sharded_update(run, ucfg, optimizer, distil=True, kl=False, cross_row_start=native * g,
                     prompt_len=cfg.data.max_prompt_len)
  a_params = _abstract(params, run.stacked_params(params))
  args = (a_params, _abstract(opt_state, run.opt_state(opt_state)), a_params,
          _abstract(rows, run.rows(rows)), routing_arrays, None)
  return fn, args


def compiled_memory_bytes(compiled) -> dict:
  """Per-device bytes from compiled.memory_analysis(): arguments (params, optimizer state,
  teachers, rows), outputs, temporaries (activations, gradients, workspace), generated
  code, and their total (argument + output + temp; aliased buffers counted once)."""
  ma = compiled.memory_analysis()
  get = lambda name: int(getattr(ma, name, 0) or 0)
  out = {"argument_bytes": get("argument_size_in_bytes"), "output_bytes": get("output_size_in_bytes"),
         "temp_bytes": get("temp_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes"),
         "generated_code_bytes": get("generated_code_size_in_bytes")}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  return out
