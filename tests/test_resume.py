"""Exact resume: the main job killed part-way (SIGKILL) or preempted (SIGTERM) and started
again with the same command ends with bitwise the parameters and the metrics of an
uninterrupted run. Runs `python -m copd_jax.main` in subprocesses, as a user does."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import paths
import xla_env
from copd_jax.config_lib import spec_of
from copd_jax import checkpoint, default_config, policy_setup, warm_start
from copd_jax.models import decoder as model_lib

REPO = paths.REPO
STEPS = 5
TIMING_KEYS = ("time/", "throughput/")  # wall-clock fields: the only ones allowed to differ


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """One saved base policy and one compilation cache for every run of this module."""
  root = tmp_path_factory.mktemp("resume")
  cfg = default_config.get("copd", "micro")
  setup = policy_setup.build_setup(spec_of(cfg))
  base = model_lib.init_params(setup.model_cfg, jax.random.key(0))
  # Saved under the recipe's metadata, so the runs load it instead of warm-starting.
  checkpoint.save_policy(str(root / "base"), base, warm_start.base_policy_metadata(spec_of(cfg)))
  # One device, as a user runs the micro config; the suite's other XLA flags (compiler
  # settings) carry over.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_env.cpu_devices_flags(1, os.environ.get("XLA_FLAGS", "")),
             # Later runs load compiled executables instead of recompiling (same results).
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return root, env


def command(root, workdir, every_steps):
  return [sys.executable, "-m", "copd_jax.main", "--config=configs/copd.py:micro",
          f"--config.workdir={workdir}", f"--config.warm_start.checkpoint_dir={root / 'base'}",
          f"--config.rl.steps={STEPS}", f"--config.checkpoint.every_steps={every_steps}"]


def run_to_end(root, env, workdir, every_steps=1):
  result = subprocess.run(command(root, workdir, every_steps), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def reference(shared):
  root, env = shared
  run_to_end(root, env, root / "reference")
  return root / "reference"


def final_params(workdir):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "final_params", "params"))


def metrics(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if not k.startswith(tuple("train/" + t for t in TIMING_KEYS))}
          for r in records]


def summary(workdir):
  s = json.load(open(os.path.join(workdir, "summary.json")))
  return {k: v for k, v in s.items() if k not in ("train_seconds", "warm_start_seconds")}


def assert_same_run(workdir, reference):
  a, b = final_params(workdir), final_params(reference)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))  # bitwise
  got, want = metrics(workdir), metrics(reference)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  assert got == want
  assert summary(workdir) == summary(reference)


def stage_steps(workdir):
  directory = os.path.join(workdir, "checkpoints", "copd")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())  # finalised only


def test_sigkill_then_resume_is_exact(shared, reference):
  root, env = shared
  workdir = root / "killed"
  proc = subprocess.Popen(command(root, workdir, every_steps=1), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  kill_after = 2
  deadline = time.monotonic() + 1200  # a safety net, generous under load
  # orbax renames <step>.orbax-checkpoint-tmp-* to <step> only once the save is complete,
  # so a plain <step> directory is a finished checkpoint (async saves cannot race this).
  while kill_after not in stage_steps(workdir):
    assert proc.poll() is None, "the run ended before a checkpoint appeared"
    assert time.monotonic() < deadline, "no checkpoint within the deadline"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=600)
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(workdir / "summary.json"), "killed after the end: nothing tested"
  killed_at = max(stage_steps(workdir))
  assert kill_after <= killed_at < STEPS

  resumed = run_to_end(root, env, workdir)
  assert f"resumed stage copd at step {killed_at}/{STEPS}" in resumed.stdout
  assert_same_run(workdir, reference)


def test_sigterm_saves_exits_cleanly_and_resumes(shared, reference):
  root, env = shared
  workdir = root / "preempted"
  # every_steps=0: the only mid-stage checkpoint is the one SIGTERM asks for.
  proc = subprocess.Popen(command(root, workdir, every_steps=0), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("copd 1/"):  # the first step finished: we are inside the loop
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.stdout.readlines()
  proc.wait(timeout=600)
  out = "".join(lines)
  assert proc.returncode == 0, out[-3000:]
  assert "preempted: received SIGTERM: saved stage 'copd' at step" in out
  assert not os.path.exists(workdir / "summary.json")
  saved = stage_steps(workdir)
  assert len(saved) == 1 and 1 <= saved[0] < STEPS, saved

  resumed = run_to_end(root, env, workdir, every_steps=0)
  assert f"resumed stage copd at step {saved[0]}/{STEPS}" in resumed.stdout
  assert_same_run(workdir, reference)
