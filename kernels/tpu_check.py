"""Compile every Pallas kernel with the real TPU (Mosaic) compiler, without a TPU.

Deviceless ahead-of-time compilation: libtpu (the `jax[tpu]` extra) describes a TPU
topology's devices (`jax.experimental.topologies`); a mesh over them, abstract inputs
sharded on it, and `jax.jit(f).trace(...).lower().compile()` run the XLA TPU compiler and
the Mosaic compiler on this host. Interpret mode (the CPU tests) has no VMEM, so only
this catches a kernel whose tiles do not fit (`CompileTimeScopedVmemOom`).

Each kernel is compiled as the trainer calls it: through the public ops
(`copd_jax.kernels`) with `KernelConfig(backend='pallas')` and its default tiles, which
the ops pick for the topology's generation (`tpu_tiles.default_tiles`: the trace runs
under `jax.set_mesh`, whose devices name the generation), inside `jax.shard_map` over all
of the topology's devices with the tokens split over them, so each device's kernel sees
`tokens` rows. Forward and backward where the trainer differentiates (token log-prob +
entropy, reverse KL, splash attention); forward only for the teacher's top-k.

    from copd_jax.kernels.tpu_check import compile_kernels
    compile_kernels("v5p:1x1x1", tokens=8192, hidden=2560, vocab=151936)
    -> {"token_logprob_entropy_fwd_bwd": {"compiled": True, "error": None,
        "compile_s": 7.1, "vmem_bytes": {...}, "max_vmem_bytes": ..., ...}, ...}
"""
from __future__ import annotations

import functools
import os
import re
import time

# libtpu takes a lockfile meant for processes sharing a real TPU; a deviceless compile
# uses none, and tests or tools may run side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from copd_jax.kernels import attention, ops, tpu_tiles  # noqa: E402
from copd_jax.kernels.config import KernelConfig  # noqa: E402

KERNELS = ("token_logprob_entropy_fwd_bwd", "reverse_kl_fwd_bwd", "top_k_logprobs",
           "splash_attention_fwd_bwd")
AXIS = "devices"
# Qwen3-4B and Qwen3-VL-8B attention: 32 query heads over 8 kv heads of width 128.
ATTENTION_SHAPE = dict(heads=32, kv_heads=8, head_dim=128, seq_len=4096)


def tpu_devices(topology_name: str):
  """Abstract TPU devices of a topology ('v5p:2x2x1', 'v5e:2x2', 'v6e:1x1', ...).

  A one-chip topology needs chips_per_host_bounds=(1, 1, 1): libtpu's default host is
  2x2x1 chips and it refuses a topology smaller than one host otherwise.
  """
  bounds = [int(x) for x in topology_name.split(":")[-1].split("x")]
  kwargs = dict(chips_per_host_bounds=(1, 1, 1)) if all(b == 1 for b in bounds) else {}
  return topologies.get_topology_desc(topology_name=topology_name, platform="tpu",
                                      **kwargs).devices


def _used_vmem_bytes(hlo_text: str) -> dict[str, int]:
  """{instruction name: bytes} of scoped VMEM each tpu_custom_call (a Pallas kernel) uses,
  from the compiled HLO's backend config (memory space 1 is VMEM)."""
  found = {}
  for line in hlo_text.splitlines():
    if 'custom_call_target="tpu_custom_call"' not in line:
      continue
    name = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
    used = re.search(r'"used_scoped_memory_configs":\[(.*?)\]', line)
    if not (name and used):
      continue
    sizes = re.findall(r'"memory_space":"1","offset":"\d+","size":"(\d+)"', used.group(1))
    found[name.group(1)] = sum(int(s) for s in sizes)
  return found


def _short_error(error: Exception) -> str:
  """The error's first line, plus the compiler's scoped-VMEM sentence when there is one."""
  text = f"{type(error).__name__}: {error}"
  lines = [line for line in text.splitlines() if line.strip()]
  summary = lines[0][:300] if lines else type(error).__name__
  vmem = re.search(r"Scoped allocation with size [^.]*\.[^.]*\.", text)
  if vmem and vmem.group(0) not in summary:
    summary += " " + vmem.group(0)
  name = re.search(r"allocating on stack for %([\w.\-]+)", text)
  if name:
    summary += f" (kernel {name.group(1)})"
  return summary


def _sharded(mesh, shape, dtype, spec):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _lm_head_programs(mesh, *, tokens, hidden, vocab, dtype, kernel, top_k):
  """{name: (function, abstract args)}: per device [tokens, hidden] rows, the head whole."""
  n = tokens * mesh.size
  rows = _sharded(mesh, (n, hidden), dtype, P(AXIS))
  ids = _sharded(mesh, (n,), jnp.int32, P(AXIS))
  head = _sharded(mesh, (hidden, vocab), dtype, P())

  def data_parallel(body, in_specs, out_specs):
    # check_vma=False: the kernels' out_shapes carry no varying-axes annotation.
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)

  def stats_grads(h, w, t):
    def loss(h, w):
      logprobs, entropy = ops.token_logprob_entropy(h, w, t, kernel=kernel)
      return jnp.sum(logprobs) + 0.01 * jnp.sum(entropy)
    d_h, d_w = jax.grad(loss, argnums=(0, 1))(h, w)
    return d_h, jax.lax.psum(d_w, AXIS)

  def rkl_grads(h, w, t_h, t_w):
    def loss(h, w):
      return jnp.sum(ops.full_vocab_reverse_kl(h, w, t_h, t_w, kernel=kernel))
    d_h, d_w = jax.grad(loss, argnums=(0, 1))(h, w)
    return d_h, jax.lax.psum(d_w, AXIS)

  def teacher_top_k(h, w, t):
    scores = ops.sampled_token_logprobs(h, w, t, kernel=kernel, top_k=top_k)
    return scores.top_k_logprobs, scores.top_k_ids

  return {
      "token_logprob_entropy_fwd_bwd": (
          data_parallel(stats_grads, (P(AXIS), P(), P(AXIS)), (P(AXIS), P())),
          (rows, head, ids)),
      "reverse_kl_fwd_bwd": (
          data_parallel(rkl_grads, (P(AXIS), P(), P(AXIS), P()), (P(AXIS), P())),
          (rows, head, rows, head)),
      "top_k_logprobs": (
          data_parallel(teacher_top_k, (P(AXIS), P(), P(AXIS)), (P(AXIS), P(AXIS))),
          (rows, head, ids)),
  }


def _attention_program(mesh, *, tokens, dtype, heads, kv_heads, head_dim, seq_len):
  """Splash attention forward + backward on `tokens` per device, in sequences of seq_len."""
  seq_len = min(seq_len, tokens)
  sequences = max(1, tokens // seq_len) * mesh.size
  groups = heads // kv_heads
  q = _sharded(mesh, (sequences, seq_len, kv_heads, groups, head_dim), dtype, P(AXIS))
  kv = _sharded(mesh, (sequences, seq_len, kv_heads, head_dim), dtype, P(AXIS))
  valid = _sharded(mesh, (sequences, seq_len), jnp.bool_, P(AXIS))

  def grads(q, k, v, valid):
    def loss(q, k, v):
      return jnp.sum(attention.splash_attention(q, k, v, valid, valid))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  program = jax.shard_map(grads, mesh=mesh, in_specs=(P(AXIS),) * 4,
                          out_specs=(P(AXIS),) * 3, check_vma=False)
  return program, (q, kv, kv, valid)


def _compile_one(mesh, function, args) -> dict:
  start = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      compiled = jax.jit(function).trace(*args).lower().compile()
  except Exception as error:  # noqa: BLE001 -- the compiler's error is the result
    return {"compiled": False, "error": _short_error(error),
            "compile_s": round(time.perf_counter() - start, 2)}
  vmem = _used_vmem_bytes(compiled.as_text())
  return {"compiled": True, "error": None, "compile_s": round(time.perf_counter() - start, 2),
          "vmem_bytes": vmem, "max_vmem_bytes": max(vmem.values(), default=0)}


def compile_kernels(topology_name: str, *, tokens: int, hidden: int, vocab: int,
                    dtype=jnp.bfloat16, top_k: int = 16, token_tile: int | None = None,
                    vocab_tile: int | None = None, kernels=KERNELS,
                    attention_shape: dict | None = None) -> dict[str, dict]:
  """Compile each Pallas kernel for a TPU topology; returns {kernel name: result}.

  topology_name: e.g. 'v5p:1x1x1', 'v5e:2x2', 'v6e:1x1' (libtpu's names). tokens: rows
  each device's kernel sees; hidden, vocab: the LM head's D and V; dtype: of hidden
  states and head. token_tile / vocab_tile: None (the default tiles of the topology's
  generation, what the trainer uses) or a forced tile for the LM-head kernels. kernels:
  a subset of KERNELS. attention_shape: overrides of ATTENTION_SHAPE (heads, kv_heads,
  head_dim, seq_len) for splash attention.

  Each result: compiled (bool), error (the compiler's message, shortened, or None),
  compile_s; when compiled, vmem_bytes ({kernel instruction: scoped VMEM bytes the
  compiler allocated}) and max_vmem_bytes; for the LM-head kernels, tiles
  [token_tile, vocab_tile] and vmem_limit_bytes (what the kernels ask for).
  """
  unknown = set(kernels) - set(KERNELS)
  if unknown:
    raise ValueError(f"kernels: unknown {sorted(unknown)}; choose from {KERNELS}")
  devices = tpu_devices(topology_name)
  mesh = Mesh(devices, (AXIS,))
  generation = tpu_tiles.generation_of_device_kind(devices[0].device_kind)
  kernel = KernelConfig("pallas", token_tile=token_tile, vocab_tile=vocab_tile)
  programs = _lm_head_programs(mesh, tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype,
                               kernel=kernel, top_k=top_k)
  op_of = {"token_logprob_entropy_fwd_bwd": "token_logprob_entropy",
           "reverse_kl_fwd_bwd": "reverse_kl", "top_k_logprobs": "top_k_logprobs"}
  results = {}
  for name in kernels:
    if name == "splash_attention_fwd_bwd":
      shape = dict(ATTENTION_SHAPE, **(attention_shape or {}))
      results[name] = _compile_one(mesh, *_attention_program(mesh, tokens=tokens, dtype=dtype,
                                                             **shape))
      results[name]["attention_shape"] = shape
      continue
    result = _compile_one(mesh, *programs[name])
    tiles = tpu_tiles.default_tiles(generation, hidden, vocab, dtype, op=op_of[name],
                                    top_k=top_k)
    result["tiles"] = [token_tile or tiles.token_tile, vocab_tile or tiles.vocab_tile]
    result["vmem_limit_bytes"] = tiles.vmem_limit_bytes
    results[name] = result
  return results


def _main():
  import argparse
  import json
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5p:1x1x1")
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--hidden", type=int, default=2560)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--token_tile", type=int, default=None)
  parser.add_argument("--vocab_tile", type=int, default=None)
  parser.add_argument("--kernels", default=",".join(KERNELS))
  args = parser.parse_args()
  results = compile_kernels(args.topology, tokens=args.tokens, hidden=args.hidden,
                            vocab=args.vocab, token_tile=args.token_tile,
                            vocab_tile=args.vocab_tile, kernels=args.kernels.split(","))
  print(json.dumps({"topology": args.topology, "tokens": args.tokens, "hidden": args.hidden,
                    "vocab": args.vocab, "kernels": results}))


if __name__ == "__main__":
  _main()
