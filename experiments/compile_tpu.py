"""Compile every program of a run for a TPU topology, on this machine, without a TPU.

    python experiments/compile_tpu.py --config=configs/pod_4b.py [--topology=v5p:4x4x12]
        [--layers=N] [--programs=sampler,opd_update] [--set=rl.micro_batch_rows=32]
        [--out=experiments/results/tpu/pod_4b.json]
    python experiments/compile_tpu.py --quick [--config=configs/pod_4b.py]

libtpu (pip install "jax[tpu]==<jax version>") compiles for an abstract topology: the
real XLA TPU compiler and the Mosaic compiler for Pallas kernels. Programs (the run's own
builders; copd_jax/analysis/tpu_compile.py): the sampler (prefill + decode loop),
teacher scoring, the RL update, the OPD update, the merge. For each: per-device bytes
(arguments, outputs, temporaries) against the chip's HBM, FLOPs and bytes accessed, a
roofline time, the compile time. The topology defaults to the config's pod
(config.pod.tpu:config.pod.topology). With --out, each program's figures are written as
it finishes, and a rerun skips the programs already there (a long compile resumes).

--quick (at most ~10 minutes here): every Pallas kernel compiled with its default tiles
for v5e, v5p and v6e at the Qwen3-4B LM-head shape (8192 tokens, D = 2560, V = 151936,
bf16; copd_jax.kernels.tpu_check.compile_kernels), and every program of a small version of the
config (tpu_compile.small_config) on a 4-chip v5p slice.

What this cannot check: speed and numerics on a real chip (nothing runs; the roofline
ignores collectives and latency). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from copd_jax.config_lib import spec_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

QUICK_GENERATIONS = {"v5e": "v5e:1x1", "v5p": "v5p:1x1x1", "v6e": "v6e:1x1"}
QUICK_KERNEL_SHAPE = dict(tokens=8192, hidden=2560, vocab=151936)


def parse_override(text: str):
  """'a.b=value' -> ('a.b', value) with value a Python literal when it parses as one."""
  field, sep, raw = text.partition("=")
  if not sep or not field:
    raise ValueError(f"--set {text!r}: expected field=value, e.g. rl.micro_batch_rows=32")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return field, value


def load_config(spec: str, overrides=()):
  from copd_jax import cli
  cfg = cli.load_config_file(spec)
  for text in overrides:
    field, value = parse_override(text)
    if not cli.has_field(cfg, field):
      raise ValueError(f"--set {text!r}: the config has no field {field!r}")
    cli.set_field(cfg, field, value)
  return cfg


def default_topology(cfg) -> str:
  pod = cfg.get("pod")
  if pod is None or not pod.get("tpu") or not pod.get("topology"):
    raise ValueError("the config has no pod (config.pod.tpu / topology): pass --topology, "
                     "e.g. --topology=v5p:2x2x1")
  return f"{pod.tpu}:{pod.topology}"


def compile_kernels_quick(log) -> tuple[dict, dict]:
  """({generation: {kernel: compiled?}}, {generation: {kernel: error}}) from
  copd_jax.kernels.tpu_check.compile_kernels on one chip of each generation."""
  import jax.numpy as jnp
  try:
    from copd_jax.kernels import tpu_check
  except ImportError as err:
    return {}, {"all": f"copd_jax.kernels.tpu_check is not available ({err})"}
  compiled, errors = {}, {}
  for generation, topology in QUICK_GENERATIONS.items():
    log(f"compiling the Pallas kernels for {topology} ...")
    t0 = time.perf_counter()
    try:
      result = tpu_check.compile_kernels(topology, dtype=jnp.bfloat16, **QUICK_KERNEL_SHAPE)
      compiled[generation] = {k: bool(r.get("compiled")) for k, r in result.items()}
      failed = {k: r.get("error") for k, r in result.items() if not r.get("compiled")}
      if failed:
        errors[generation] = failed
    except Exception as err:  # report and go on to the next generation
      compiled[generation] = {}
      errors[generation] = f"{type(err).__name__}: {str(err)[:500]}"
    log(f"  {generation}: {compiled[generation]} ({time.perf_counter() - t0:.0f} s)")
  return compiled, errors


def quick(args, log) -> dict:
  from copd_jax.analysis import tpu_compile
  t0 = time.perf_counter()
  kernels, kernel_errors = compile_kernels_quick(log)
  base = load_config(args.config, args.set)
  # Sharded over the 4 chips (what a pod run compiles), then on one chip (every program
  # through the TPU and Mosaic compilers without SPMD partitioning).
  log(f"small {args.config} on {tpu_compile.SMALL_TOPOLOGY}, mesh fsdp=2 x tensor=2:")
  sharded = tpu_compile.compile_run(tpu_compile.small_config(spec_of(base), chips=4),
                                    tpu_compile.SMALL_TOPOLOGY, log=log)
  # The programs the sharded pass could not compile, on one chip (no partitioning).
  failed = tuple(name for name, fig in sharded.items() if "error" in fig)
  one_chip = {}
  if failed:
    log(f"small {args.config} on one chip of {tpu_compile.SMALL_TOPOLOGY}:")
    one_chip = tpu_compile.compile_run(tpu_compile.small_config(spec_of(base), chips=1),
                                       tpu_compile.SMALL_TOPOLOGY, names=failed, log=log)
  kernels_ok = len(kernels) == len(QUICK_GENERATIONS) and not kernel_errors and all(
      k and all(k.values()) for k in kernels.values())
  ok = lambda programs: all("error" not in p for p in programs.values())  # noqa: E731
  return {"kernels_compiled": kernels, "all_kernels_compiled": kernels_ok,
          "kernel_errors": kernel_errors,
          "programs_compiled": ok(sharded),
          "programs_compiled_one_chip": ok(dict(sharded, **one_chip)),
          "programs_topology": tpu_compile.SMALL_TOPOLOGY,
          "programs": {"sharded_4_chips": sharded, "one_chip": one_chip},
          "wall_s": round(time.perf_counter() - t0, 1)}


def full(args, log) -> dict:
  from copd_jax.analysis import tpu_compile
  cfg = load_config(args.config, args.set)
  topology = args.topology or default_topology(cfg)
  names = tuple(args.programs.split(",")) if args.programs else tpu_compile.PROGRAMS
  record = {"config": args.config, "overrides": list(args.set), "topology": topology,
            "chips": tpu_compile.chips_in(topology), "mesh": dict(cfg.mesh),
            "num_layers": args.layers or tpu_compile.text_config(
                tpu_compile.run_model_config(spec_of(cfg))).num_layers, "programs": {}}
  if args.out and os.path.exists(args.out):
    with open(args.out) as f:
      previous = json.load(f)
    same = all(previous.get(k) == record[k] for k in ("topology", "num_layers", "overrides"))
    if same:  # keep every program's figures; recompile the asked ones not yet compiled
      record["programs"] = dict(previous.get("programs", {}))
  todo = [n for n in names if n not in record["programs"] or "error" in record["programs"][n]]
  for name in todo:
    figures = tpu_compile.compile_run(spec_of(cfg), topology, args.layers, names=(name,), log=log)
    record["programs"].update(figures)
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
  record["fits"] = all(p.get("hbm_fraction", 2.0) <= 0.9 for p in record["programs"].values())
  return record


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "pod_4b.py"),
                      help="a config file (path[:arg])")
  parser.add_argument("--topology", default="", help="e.g. v5p:4x4x12 (default: config.pod)")
  parser.add_argument("--layers", type=int, default=None,
                      help="decoder layers to compile (default: the model's)")
  parser.add_argument("--programs", default="", help="comma-separated subset of the programs")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field (repeatable)")
  parser.add_argument("--out", default="", help="write the figures here as JSON (resumable)")
  parser.add_argument("--quick", action="store_true",
                      help="kernels for v5e/v5p/v6e + every program of a small config")
  parser.add_argument("--table", nargs="*", metavar="JSON",
                      help="print a markdown table of --out files (default: "
                           "experiments/results/tpu/*.json) and exit")
  args = parser.parse_args(argv)
  if args.table is not None:
    import glob
    from copd_jax.analysis import tpu_compile
    paths = args.table or sorted(glob.glob(os.path.join(REPO, "experiments", "results", "tpu",
                                                        "*.json")))
    records = []
    for path in paths:
      with open(path) as f:
        records.append(json.load(f))
    print(tpu_compile.figures_table(records))
    return records
  log = lambda line: print(line, flush=True)  # noqa: E731
  result = quick(args, log) if args.quick else full(args, log)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
