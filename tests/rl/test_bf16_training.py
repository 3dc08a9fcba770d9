"""CoPD trains end to end with a bf16 compute dtype and grouped KV heads.

The other method tests run the micro config in f32 with one KV head. The toy recipe runs
in bf16 with two KV heads, where a bf16 x bf16 -> f32 attention-gradient dot once reached
XLA:CPU's generic dot, which has no such kernel, and the first update failed at run time
("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32")."""
import json

import jax
import numpy as np

import micro_runs

from copd_jax import config_lib, default_config, policy_setup
from copd_jax.config_lib import spec_of
from copd_jax.models import decoder


def test_copd_runs_an_rl_and_an_opd_step_in_bf16_with_two_kv_heads(tmp_path):
  cfg = default_config.get("copd", "micro")
  cfg.workdir = str(tmp_path / "copd")
  cfg.model.update(dict(dtype="bfloat16", num_heads=4, num_kv_heads=2))
  cfg.rl.update(dict(steps=2, eval_every=1000))  # micro schedule 1:1: one RL, one OPD step
  config_lib.validate_config(cfg)
  setup = policy_setup.build_setup(spec_of(cfg))
  summary = micro_runs.run_method(cfg, (setup, decoder.init_params(setup.model_cfg,
                                                                   jax.random.key(0))))
  assert summary["steps"] == 2
  for branch, counts in summary["updates"]["copd"].items():
    assert counts == {"applied": 2, "skipped": 0}, (branch, counts)
  with open(tmp_path / "copd" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  losses = [v for r in rows for k, v in r.items() if k.startswith("train/") and k.endswith("/loss")]
  opd = [v for r in rows for k, v in r.items() if k.startswith("train/") and k.endswith("opd/tokens")]
  assert losses and np.isfinite(losses).all()
  assert opd and max(opd) > 0  # the second step distilled
