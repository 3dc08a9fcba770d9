"""A LoRA CoPD run from a Hugging Face Qwen3 checkpoint (the tiny committed fixture and
record files), through copd_jax.main.run: it trains the adapters on the shared base,
saves them, and `export_run` writes the weight-space merge as a normal checkpoint that
reloads with the logits of load_run_policy's merged model."""
import os

import numpy as np
import orbax.checkpoint as ocp

from copd_jax import export as export_hf, main
from copd_jax.models import decoder as model_lib, hf_checkpoint, lora
from test_hf_path import hf_config


def test_lora_copd_run_from_a_qwen3_checkpoint_exports_its_merge(tmp_path):
  cfg = hf_config()
  cfg.workdir = str(tmp_path / "copd")
  cfg.model.lora.rank = 2
  cfg.model.lora.alpha = 8.0
  summary = main.run(cfg)
  assert set(summary["branches"]) == {"math", "science"}
  stored = ocp.StandardCheckpointer().restore(os.path.join(cfg.workdir, "final_params",
                                                           "params"))
  assert set(stored) == {"base", "adapters"}
  b = stored["adapters"]["layers_0"]["self_attn"]["v_proj"]["lora_b"]
  assert b.shape[0] == 2 and np.abs(b).max() > 0  # two branches' adapters, trained

  _, model_cfg, merged = export_hf.load_run_policy(cfg.workdir)
  base_cfg, base = hf_checkpoint.load_qwen3(cfg.init.hf_checkpoint)
  out = str(tmp_path / "exported")
  export_hf.export_run(cfg.workdir, out, dtype="float32")
  reloaded_cfg, reloaded = hf_checkpoint.load_qwen3(out)
  tokens = np.array([[5, 9, 17, 33, 2]], np.int32)
  mask = np.ones_like(tokens, bool)
  positions = model_lib.positions_from_mask(mask)

  def logits(p, c):
    return np.asarray(model_lib.logits_from_hidden(
        model_lib.forward_hidden(p, c, tokens, positions, mask, None), model_lib.lm_head(p, c)))
  np.testing.assert_array_equal(logits(reloaded, reloaded_cfg), logits(merged, model_cfg))
  # The merge is W + mean_k scale B_k A_k of the stored adapters.
  q = stored["adapters"]["layers_1"]["mlp"]["down_proj"]
  scale = cfg.model.lora.alpha / cfg.model.lora.rank
  want = np.asarray(base["layers_1"]["mlp"]["down_proj"]["kernel"], np.float64) + np.mean(
      [scale * (np.asarray(q["lora_b"][k], np.float64) @ np.asarray(q["lora_a"][k])).T
       for k in range(2)], axis=0)
  np.testing.assert_allclose(np.asarray(merged["layers_1"]["mlp"]["down_proj"]["kernel"]), want,
                             atol=1e-6, rtol=0)
  assert lora.spec_from_config(cfg).rank == 2
