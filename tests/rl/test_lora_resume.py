"""A LoRA run (config.model.lora.rank > 0) resumes bitwise: its checkpoints hold the shared
base, the adapters and the adapters' optimizer state, and a run restarted from a mid-stage
checkpoint ends with the same final parameters and metrics as the uninterrupted one; for
the toy policy and for Qwen3-VL (the committed tiny checkpoint and its image / video
records). (In one process, as the micro-run tests do; tests/test_resume.py kills real
processes.)"""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from copd_jax import config_lib, default_config, policy_setup
from copd_jax.models import decoder, qwen3_vl_import
from micro_runs import run_method
from test_qwen3_vl_run import vl_config

TIMING = ("train/time/", "train/throughput/")


def lora_config(workdir):
  cfg = default_config.get("copd", "micro")
  cfg.workdir = str(workdir)
  cfg.model.lora.rank = 2
  cfg.rl.steps = 2
  cfg.rl.loss.entropy_coef = 0.01  # rewards of a random policy are 0: move the adapters
  cfg.checkpoint.every_steps = 1
  cfg.checkpoint.async_save = False
  config_lib.validate_config(cfg)
  return cfg


def final_params(workdir):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "final_params", "params"))


def metrics(workdir):
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in lines]


def test_lora_run_resumes_bitwise_from_a_mid_stage_checkpoint(tmp_path):
  cfg = lora_config(tmp_path / "run")
  setup = policy_setup.build_setup(config_lib.spec_of(cfg))
  base = decoder.init_params(setup.model_cfg, jax.random.key(0))
  run_method(cfg, (setup, base))
  want_params, want_metrics = final_params(cfg.workdir), metrics(cfg.workdir)
  assert set(want_params) == {"base", "adapters"}  # the LoRA layout was saved
  stage_dir = os.path.join(cfg.workdir, "checkpoints", "copd")
  assert sorted(d for d in os.listdir(stage_dir) if d.isdigit()) == ["1", "2"]
  adam = ocp.StandardCheckpointer().restore(os.path.join(stage_dir, "2", "state"))
  # Optimizer state for the adapters only: no moment of a base parameter.
  state_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(adam["opt_state"])[0]]
  assert state_paths and not any("kernel" in p or "embedding" in p for p in state_paths)
  moved = want_params["adapters"]["layers_0"]["mlp"]["up_proj"]["lora_b"]
  assert np.abs(moved).max() > 0  # the adapters trained (B starts at zero)

  # As if killed after step 1's checkpoint: the later checkpoint and results are gone.
  shutil.rmtree(os.path.join(stage_dir, "2"))
  shutil.rmtree(os.path.join(cfg.workdir, "final_params"))
  run_method(cfg, (setup, base))
  got_params = final_params(cfg.workdir)
  assert jax.tree.structure(got_params) == jax.tree.structure(want_params)
  for x, y in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))  # bitwise
  assert metrics(cfg.workdir) == want_metrics


def assert_bitwise_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))


def test_lora_qwen3_vl_run_resumes_bitwise_from_its_rl_step_checkpoint(tmp_path):
  """Qwen3-VL with rank-2 adapters, image and video branches: step 1 RL, step 2 OPD (the
  branches score each other's rows through their adapters). Killed after step 1's
  checkpoint, the resumed run's step 2 -- an AdamW step whose moments come from step 1 --
  gives the uninterrupted run's adapters and metrics bit for bit."""
  cfg = vl_config(tmp_path / "run", None)
  cfg.model.lora.rank = 2
  cfg.rl.steps = 2
  cfg.rl.loss.entropy_coef = 0.01  # the random fixture never answers right: move anyway
  cfg.rl.eval_every = 1000
  cfg.rl.diagnostics_every = 1000
  cfg.log.completions_every = 0
  cfg.eval.num_examples = 1
  cfg.checkpoint.every_steps = 1
  cfg.checkpoint.async_save = False
  config_lib.validate_config(cfg)
  setup = policy_setup.build_setup(config_lib.spec_of(cfg))
  _, base = qwen3_vl_import.load_qwen3_vl(cfg.init.hf_checkpoint)
  run_method(cfg, (setup, base))
  want_params, want_metrics = final_params(cfg.workdir), metrics(cfg.workdir)
  assert set(want_params) == {"base", "adapters"}
  assert "visual" in want_params["base"] and "visual" not in want_params["adapters"]
  second = {k: v for r in want_metrics if r.get("step") == 2 for k, v in r.items()}
  assert second["train/opd_weight"] == 1.0  # step 2 distils
  stage_dir = os.path.join(cfg.workdir, "checkpoints", "copd")
  assert sorted(d for d in os.listdir(stage_dir) if d.isdigit()) == ["1", "2"]
  b = want_params["adapters"]["layers_0"]["self_attn"]["q_proj"]["lora_b"]
  assert b.shape[0] == 3 and np.abs(b).max() > 0  # three branches' adapters, trained

  shutil.rmtree(os.path.join(stage_dir, "2"))  # as if killed after step 1's checkpoint
  shutil.rmtree(os.path.join(cfg.workdir, "final_params"))
  run_method(cfg, (setup, base))
  assert_bitwise_equal(final_params(cfg.workdir), want_params)
  assert metrics(cfg.workdir) == want_metrics
