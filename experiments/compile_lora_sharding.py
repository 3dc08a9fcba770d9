"""Which sharding of LoRA adapters is cheaper on the pod: the OPD update of
configs/pod_4b.py (v5p 4x4x12, expert=3 x fsdp 16 x tensor 4) with rank-16 adapters on
every projection, compiled for TPU without a TPU (copd_jax/analysis/tpu_compile.py) twice:

  like_base   adapters [S, r, in] / [S, out, r] with in / out sharded like the base kernel
              (fsdp / tensor inside each branch's devices), the branch axis on `expert`;
  replicated  the branch axis on `expert`, the rest whole on every device of the branch.

    python experiments/compile_lora_sharding.py [--layers=0] [--rank=16]
        [--out=experiments/results/tpu/lora_sharding.json]

Per-device bytes and bytes accessed of each variant (all 36 layers by default: they run
under one nn.scan, so the compile costs about one layer's; --layers=N cuts the decoder). Resumable: variants already in --out are
skipped. --bytes_only: the per-device bytes of adapters, their AdamW state and the base
from the shardings alone (seconds, no compile). Last line: one JSON object.

Results (experiments/results/tpu/lora_sharding_bytes.json, --bytes_only, rank 16, all 36
layers): per device, like_base holds 25.3 MB of adapters + 50.6 MB of AdamW moments,
replicated 132.1 MB + 264.2 MB (5.2x); the base is 279.6 MB either way. Hence
lora.ADAPTER_SHARDING = "like_base". The compile at reduced depth (--layers=2, the OPD
update; experiments/results/tpu/lora_sharding_2layers.json) agrees: per device, like_base
5,071,312,832 B (arguments 1.76 GB, temporaries 3.31 GB), replicated 5,105,208,384 B
(+33.9 MB, +0.67%: the adapters and their moments whole on every device of a branch, as
arguments and outputs; temporaries equal within 1.1 MB); compiled in 2069 s and 820 s on
the shared 2-core CPU. Resumable: it writes each
variant to --out as it finishes and skips those already there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

VARIANTS = ("like_base", "replicated")


def compile_variant(variant: str, layers: int, rank: int, programs) -> dict:
  from configs import pod_4b
  from copd_jax import config_lib
  from copd_jax.analysis import tpu_compile
  from copd_jax.models import lora
  lora.ADAPTER_SHARDING = variant  # read when the run's parameter axes are declared
  cfg = pod_4b.get_config()
  cfg.model.lora.rank = rank
  cfg.model.lora.alpha = 2.0 * rank
  cfg = config_lib.spec_of(cfg)  # compile_run takes the run's RunSpec, not the raw config
  topology = f"{cfg.pod.tpu}:{cfg.pod.topology}"
  return tpu_compile.compile_run(cfg, topology, num_layers=layers, names=programs,
                                 log=lambda line: print(line, flush=True))


def shard_bytes(variant: str, rank: int) -> dict:
  """Per-device bytes of the adapters, their AdamW state and the base under `variant`,
  from the shardings' shard shapes on the pod's abstract TPU devices (no compile)."""
  import math

  import jax

  from configs import pod_4b
  from copd_jax import config_lib
  from copd_jax.analysis import tpu_compile
  from copd_jax.models import lora
  from copd_jax.rl import update as update_lib
  lora.ADAPTER_SHARDING = variant
  config = pod_4b.get_config()
  config.model.lora.rank = rank
  cfg = config_lib.spec_of(config)
  run = tpu_compile.run_sharding(cfg, f"{cfg.pod.tpu}:{cfg.pod.topology}")
  params = tpu_compile.abstract_params(tpu_compile.run_model_config(cfg), cfg.num_experts,
                                       cfg.lora)
  optimizer = update_lib.make_optimizer(1e-6, 1.0)
  state = jax.eval_shape(lambda q: update_lib.init_optimizer_state(optimizer, q), params)

  def per_device(tree, shardings):
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))
  placed = run.stacked_params(params)
  return {"adapter_bytes_per_device": per_device(params.adapters, placed.adapters),
          "adapter_adam_bytes_per_device": per_device(state, run.opt_state(state)),
          "base_bytes_per_device": per_device(params.base, placed.base)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=0, help="0 = the whole decoder")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--programs", default="opd_update")
  parser.add_argument("--out", default="experiments/results/tpu/lora_sharding.json")
  parser.add_argument("--bytes_only", action="store_true",
                      help="per-device bytes from the shardings only, no compile")
  args = parser.parse_args(argv)
  if args.bytes_only:
    print(json.dumps({"bench": "lora_sharding_bytes", "rank": args.rank,
                      "variants": {v: shard_bytes(v, args.rank) for v in VARIANTS}}))
    return
  out = {"layers": args.layers, "rank": args.rank, "variants": {}}
  if os.path.exists(args.out):
    previous = json.load(open(args.out))
    if previous.get("layers") == args.layers and previous.get("rank") == args.rank:
      out = previous
  for variant in VARIANTS:
    if variant in out["variants"]:
      continue
    out["variants"][variant] = compile_variant(variant, args.layers or None, args.rank,
                                               tuple(args.programs.split(",")))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)
  fig = {v: {p: {k: r.get(k) for k in ("per_device_bytes", "argument_bytes", "temp_bytes",
                                       "bytes_accessed", "flops", "error")}
             for p, r in out["variants"][v].items()} for v in out["variants"]}
  print(json.dumps({"bench": "lora_sharding", "layers": args.layers, "rank": args.rank,
                    "figures": fig}))


if __name__ == "__main__":
  main()
