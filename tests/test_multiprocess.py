"""A CoPD run on 2 processes x 2 CPU devices (jax.distributed, gloo collectives on
127.0.0.1) logs the same metrics as the same run in 1 process with 4 devices.

Both runs use the mesh expert=2 x data=2: with two processes each process holds one
branch's devices, so every OPD step exchanges rollouts across the process boundary, and
each process loads only the prompts of its own devices (half of each step's batch).
"""
import json
import os
import socket

import numpy as np

import child_processes
import paths
import xla_env

REPO = paths.REPO
RUN_ARGS = [
    "--config=configs/copd.py:micro",
    "--config.rl.capabilities=('text','image')", "--config.num_experts=2",
    "--config.rl.opd.hub=text", "--config.mesh.expert=2", "--config.mesh.data=2",
    # Step 1 is an RL step, step 2 an OPD step (micro schedule: s_rl=1, s_opd=1).
    "--config.rl.steps=2",
]
# Wall-clock fields differ between any two runs; the data-loading share differs by design.
LOADED = "train/data/prompts_loaded_by_this_process"
UNTIMED = lambda key: not any(word in key for word in ("time", "throughput", "tok/s", LOADED))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = xla_env.cpu_devices_env(devices, os.environ)  # rendezvous limits, pool size
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def _main(args, env):
  return child_processes.start(child_processes.python_module("copd_jax.main", *args),
                               cwd=REPO, env=env)


def _metrics(workdir, keep_loaded=False) -> dict:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      step = record.pop("step")
      out.update({(step, k): v for k, v in record.items()
                  if (UNTIMED(k) or (keep_loaded and k == LOADED))
                  and not k.startswith("warm_start")})
  return out


def test_two_processes_match_one_process(tmp_path):
  base = str(tmp_path / "base")
  single = str(tmp_path / "single")
  multi = str(tmp_path / "multi")
  with child_processes.multi_device_slot():
    # 1 process x 4 devices (also trains and saves the shared micro base policy).
    child_processes.finish(
        _main(RUN_ARGS + [f"--config.workdir={single}",
                          f"--config.warm_start.checkpoint_dir={base}"], _env(4)),
        budget_s=1800, what="the one-process run")
    # 2 processes x 2 devices, loading that base.
    port = _free_port()
    procs = [_main(RUN_ARGS + [f"--config.workdir={multi}",
                               f"--config.warm_start.checkpoint_dir={base}",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}"], _env(2)) for i in range(2)]
    outs = child_processes.finish(procs, budget_s=1800, what="the two-process run")
  assert all("summary:" in out for out in outs)

  # Each process loads and verifies only the prompts its devices hold: with mesh
  # expert=2 x data=2 and one branch per process, half of every step's batch.
  loaded = lambda workdir: [v for (step, k), v in _metrics(workdir, keep_loaded=True).items()
                            if k == LOADED]
  assert loaded(single) and all(n > 0 for n in loaded(single))
  assert [2 * n for n in loaded(multi)] == loaded(single)
  assert loaded(os.path.join(multi, "process_1")) == loaded(multi)

  one, two = _metrics(single), _metrics(multi)
  assert set(one) == set(two)
  train_keys = [k for k in one if k[1].startswith("train/")]
  assert any("opd/delta_mean" in k[1] for k in train_keys), "the run must include an OPD step"
  assert len(train_keys) > 20
  keys = sorted(one, key=str)
  np.testing.assert_allclose([one[k] for k in keys], [two[k] for k in keys], rtol=1e-5, atol=1e-6)
  # Cross-process all-reduces may sum in another order: at most ulp-level differences.
  exact = sum(one[k] == two[k] for k in keys)
  assert exact >= 0.9 * len(keys), f"only {exact}/{len(keys)} metrics bitwise equal"

  with open(os.path.join(single, "summary.json")) as f:
    summary_one = json.load(f)
  with open(os.path.join(multi, "summary.json")) as f:
    summary_two = json.load(f)
  assert summary_one["branches"] == summary_two["branches"]
  assert summary_one["merged"] == summary_two["merged"]
  # Process 1 logs under process_1/, never into process 0's files.
  assert os.path.isfile(os.path.join(multi, "process_1", "metrics.jsonl"))
