"""Benchmark: loading a HF Qwen3 checkpoint with copd_jax.models.hf_checkpoint.load_qwen3.

For the tiny committed fixture and for a synthetic Qwen3-0.6B-shaped checkpoint (vocab
151936, hidden 1024, 28 layers, 16/8 heads, head_dim 128, mlp 3072, tied; random weights,
written here with the safetensors numpy API into a temporary folder that is deleted
afterwards), each load runs in a fresh subprocess that reports

  load_s          wall time of load_qwen3 (until every array is ready)
  read_s          wall time to read the same files' bytes into memory (in that subprocess,
                  after the load, so both see a warm page cache); load_over_read = ratio
  peak_over_disk  (peak RSS - RSS after imports) / size of the safetensors files on disk.
                  Target <= 1.5 when the params dtype equals the disk dtype: the loader
                  streams tensors and never holds two copies. A bf16 checkpoint loaded as
                  f32 params needs ~2x by construction (f32 is twice bf16), so that case is
                  also reported against the size of the params it produces (peak_over_params).

    python experiments/bench_import.py [--quick]

For the tiny fixture the peak is a fixed cost (XLA compiling a few transpose kernels, about
10 MiB), so its ratio says nothing about streaming; meets_target uses the synthetic cases.

--quick: the synthetic model has 4 layers and a 32768-token vocabulary (~0.1B params).
The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TINY_FIXTURE = os.path.join(REPO, "tests", "fixtures", "hf", "qwen3_tiny", "untied_f32")
QWEN3_0_6B = dict(vocab_size=151936, d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                  head_dim=128, mlp_dim=3072, rope_theta=1e6, tie_embeddings=True)
QUICK = dict(QWEN3_0_6B, vocab_size=32768, num_layers=4)
SHARD_BYTES = 1 << 30  # 1 GiB shards keep the writer's own memory bounded


def _rss_bytes(field: str) -> int:
  """VmRSS (current) or VmHWM (peak) of this process, from /proc/self/status."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"{field} not in /proc/self/status")


class _RandomTensor:
  """A tensor materialised only when written (so the writer holds one shard at a time)."""

  def __init__(self, shape, seed):
    self.shape, self._seed = tuple(shape), seed

  def __array__(self, dtype=None, copy=None):
    values = np.random.default_rng(self._seed).random(self.shape, dtype=np.float32) - 0.5
    return values if dtype is None else values.astype(dtype)


def write_synthetic_checkpoint(directory: str, dims: dict, dtype: str) -> int:
  """A random Qwen3 checkpoint in HF layout; returns its safetensors bytes on disk."""
  from copd_jax.models import hf_checkpoint as hfc, model_config as M
  cfg = M.ModelConfig(**dims)
  named = [(spec.hf_name, _RandomTensor(spec.hf_shape, seed))
           for seed, spec in enumerate(hfc.qwen3_tensor_specs(cfg))]
  os.makedirs(directory, exist_ok=True)
  files = hfc.write_safetensors_shards(directory, named, dtype=hfc.EXPORT_DTYPES[dtype],
                                       max_shard_bytes=SHARD_BYTES)
  with open(os.path.join(directory, hfc.CONFIG_FILE), "w") as f:
    json.dump(hfc.hf_config_from_model(cfg, torch_dtype=dtype), f)
  return sum(os.path.getsize(p) for p in files)


def child(directory: str, param_dtype: str) -> None:
  """Runs in a fresh process: one load, then one raw read; prints a JSON line."""
  import jax

  from copd_jax.models import hf_checkpoint as hfc
  jax.block_until_ready(jax.numpy.zeros(8) + 1)  # backend up before the baseline
  baseline = _rss_bytes("VmRSS")
  start = time.perf_counter()
  cfg, params = hfc.load_qwen3(directory, param_dtype=param_dtype)
  jax.block_until_ready(params)
  load_s = time.perf_counter() - start
  peak = _rss_bytes("VmHWM")
  params_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  del params
  files = hfc.safetensors_files(directory)
  start = time.perf_counter()
  for path in files:
    with open(path, "rb") as f:
      while f.read(64 << 20):
        pass
  read_s = time.perf_counter() - start
  print(json.dumps(dict(load_s=load_s, read_s=read_s, peak_bytes=peak - baseline,
                        baseline_bytes=baseline, params_bytes=params_bytes,
                        num_params=int(num_params))))


def measure(directory: str, param_dtype: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", directory,
                        "--param_dtype", param_dtype], env=env, cwd=REPO, check=True,
                       capture_output=True, text=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  from copd_jax.models import hf_checkpoint as hfc
  disk = sum(os.path.getsize(p) for p in hfc.safetensors_files(directory))
  return dict(disk_bytes=disk, num_params=result["num_params"],
              load_s=round(result["load_s"], 3), read_s=round(result["read_s"], 3),
              load_over_read=round(result["load_s"] / max(result["read_s"], 1e-9), 2),
              peak_mib=round(result["peak_bytes"] / 2**20, 1),
              peak_over_disk=round(result["peak_bytes"] / disk, 3),
              peak_over_params=round(result["peak_bytes"] / result["params_bytes"], 3))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--param_dtype", default="float32", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child, args.param_dtype)
    return
  sys.path.insert(0, REPO)
  dims = QUICK if args.quick else QWEN3_0_6B
  results = {"tiny_fixture_f32": measure(TINY_FIXTURE, "float32")}
  print(f"tiny fixture (f32): {results['tiny_fixture_f32']}\n  (its peak is a fixed cost, "
        "mostly XLA compiling the transpose kernels, not proportional to its 0.3 MB)", flush=True)
  # (name, dtype on disk, params dtype)
  cases = [("synthetic_f32_disk_f32_params", "float32", "float32"),
           ("synthetic_bf16_disk_f32_params", "bfloat16", "float32"),
           ("synthetic_bf16_disk_bf16_params", "bfloat16", "bfloat16")]
  for disk_dtype in ("float32", "bfloat16"):
    tmp = tempfile.mkdtemp(prefix="bench_import_")
    try:
      start = time.perf_counter()
      size = write_synthetic_checkpoint(tmp, dims, disk_dtype)
      print(f"wrote a synthetic {disk_dtype} checkpoint: {size / 2**20:.0f} MiB in "
            f"{time.perf_counter() - start:.1f} s", flush=True)
      for name, case_disk, params_dtype in cases:
        if case_disk == disk_dtype:
          results[name] = measure(tmp, params_dtype)
          print(f"{name}: {results[name]}", flush=True)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  results["model"] = "qwen3_0.6b_shape" if not args.quick else "qwen3_0.6b_shape_quick"
  results["target_peak_over_disk"] = 1.5
  results["meets_target"] = all(results[n]["peak_over_disk"] <= 1.5 for n in (
      "synthetic_f32_disk_f32_params", "synthetic_bf16_disk_bf16_params"))
  print(json.dumps(results))


if __name__ == "__main__":
  main()
