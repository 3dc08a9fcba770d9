"""Abstract (allocation-free) lowering of the sharded update, for memory and collective audits."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from copd_jax import run_spec
from copd_jax.sharding import RunSharding


def tree_bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def abstract_opd_update(cfg: run_spec.RunSpec, run: RunSharding, num_layers: int | None = None,
                        native_prompts: int | None = None, cross_prompts: int | None = None,
                        topology: str | None = None):
  """The CoPD OPD-step update of a RunSpec as (sharding.MeshProgram, abstract args): params,
  optimizer state and rows are jax.ShapeDtypeStruct with their shardings; nothing is
  allocated. Lower/compile with `fn.lower(*args).compile()`.

  num_layers / native_prompts / cross_prompts / topology ('hub' or 'full') override the
  config (cheap test lowering, traffic of another topology). Built by
  tpu_compile.abstract_programs (the run's own builders). On a mesh of non-TPU devices
  a config's Pallas loss (a TPU Mosaic kernel) is swapped for the portable chunked
  backend with the same tiles, so the CPU compiler can size the rest of the step.
  Rows: [S, (native + cross) * G, max_prompt_len + max_response_len]; routing: the live
  teachers' topology (hub = rl.opd.hub), as CoPD uses it.
  """
  from copd_jax.analysis import tpu_compile
  changes = {}
  if native_prompts is not None:
    changes["rl.native_prompts"] = int(native_prompts)
  if cross_prompts is not None:
    changes["rl.cross_prompts"] = int(cross_prompts)
  if topology is not None:
    changes["rl.opd.topology"] = topology
  platform = run.mesh.devices.flat[0].platform
  if platform != "tpu" and cfg.rl.kernel.backend == "pallas":
    changes["rl.kernel.backend"] = "chunked"
  cfg = run_spec.replace_fields(cfg, changes)
  (program,) = tpu_compile.abstract_programs(cfg, run, num_layers, names=("opd_update",))
  return program.fn, program.args


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
