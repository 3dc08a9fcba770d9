#!/usr/bin/env bash
# Runs the sampler and fused-loss benchmarks on a lent GPU machine, which has jax/flax/optax
# preinstalled but no network: the repo is imported from the working tree (no pip install).
set -u
cd "$(dirname "$0")/../.."
[ -e copd_jax/kernels ] || ln -s ../kernels copd_jax/kernels   # what setup.py's package_dir does
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee -a "$OUT/env.txt"
for dt in float32 bfloat16; do
  timeout 200 python experiments/bench_sampler.py --dtype $dt 2>&1 | tee "$OUT/bench_sampler_$dt.txt" | tail -4
done
timeout 200 python experiments/bench_loss.py 2>&1 | tee "$OUT/bench_loss.txt" | tail -6
