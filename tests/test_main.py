"""End-to-end: the main job on the micro config, run as a user runs it."""
import json
import os
import subprocess
import sys

import paths

REPO = paths.REPO


def run_main(*flags, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "copd_jax.main", *flags], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_main_job_micro_trains_evaluates_and_reloads(tmp_path):
  workdir = str(tmp_path / "run")
  flags = ["--config=configs/base.py:micro", f"--config.workdir={workdir}",
           f"--config.warm_start.checkpoint_dir={tmp_path / 'base_policy'}"]
  first = run_main(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "trained base policy" in first.stdout
  assert "warm-start 4/4" in first.stdout  # the progress line
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  for cap in ("text", "image", "video", "overall"):
    assert 0.0 <= summary[f"accuracy/{cap}"] <= 1.0
  assert summary["base_policy_loaded"] is False
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tb")))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("warm_start/loss" in l for l in lines)
  assert any("eval/accuracy/overall" in l for l in lines)

  # A second run with the same recipe reuses the saved base and gets the same accuracy.
  second = run_main(*flags)
  assert second.returncode == 0, second.stderr[-3000:]
  again = json.load(open(os.path.join(workdir, "summary.json")))
  assert again["base_policy_loaded"] is True
  assert again["accuracy/overall"] == summary["accuracy/overall"]

  # A different recipe pointed at the same base directory fails, naming what differs.
  third = run_main(*flags, "--config.warm_start.steps=5")
  assert third.returncode != 0
  assert "warm_start.steps" in third.stderr


def test_main_job_rejects_bad_config_before_compiling(tmp_path):
  result = run_main("--config=configs/base.py:micro", f"--config.workdir={tmp_path}",
                    "--config.warm_start.batch_size=0")
  assert result.returncode != 0
  assert "config.warm_start.batch_size must be a positive integer" in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, "summary.json"))


def test_main_job_rejects_unknown_field(tmp_path):
  result = run_main("--config=configs/base.py:micro", f"--config.workdir={tmp_path}",
                    "--config.warm_start.stepz=3")
  assert result.returncode != 0
  assert "stepz" in result.stderr
