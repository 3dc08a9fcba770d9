"""From a local HF checkpoint + record files to a run: config checks, setup (model config,
chat-template prompts, stop/banned ids), held-out records, the base policy load, and an
evaluation through copd_jax.main.run, on the tiny committed fixtures."""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

import fixture_configs
import paths
from copd_jax.config_lib import spec_of
from copd_jax import config_lib, policy_setup, warm_start
from copd_jax.models import hf_checkpoint

REPO = paths.REPO


def hf_config(arg="micro"):
  """configs/hf_copd.py:<arg> on the committed fixtures."""
  return fixture_configs.load("hf_copd", arg)


def test_shipped_hf_config_validates_on_the_injected_fixtures():
  for arg in ("", "micro", "math,science,micro"):
    cfg = hf_config(arg)
    config_lib.validate_config(cfg)
    assert os.path.isfile(os.path.join(cfg.init.hf_checkpoint, "config.json"))
  assert tuple(hf_config("math,micro").tasks.capabilities) == ("math",)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.init.update(hf_checkpoint=""), r"data.train_files needs config.init.hf_checkpoint"),
    (lambda c: c.init.update(hf_checkpoint="/nonexistent"), r"init.hf_checkpoint must be an existing directory"),
    (lambda c: c.init.update(hf_tokenizer=REPO), r"init.hf_tokenizer must hold tokenizer.json"),
    (lambda c: c.data.train_files.update(math="/nonexistent.jsonl"), r"data.train_files.math must name existing"),
    (lambda c: c.data.eval_files.update(math=""), r"data.eval_files.math must name existing"),
    (lambda c: setattr(c.data, "eval_files", {"math": "x"}), r"data.eval_files must give files for exactly"),
    (lambda c: c.tasks.update(capabilities=("math", "Science")), r"tasks.capabilities has 'Science'"),
])
def test_bad_record_or_checkpoint_config_names_the_field(change, message):
  cfg = hf_config()
  change(cfg)
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(cfg)


def test_setup_reads_the_checkpoint_and_chat_renders_prompts():
  cfg = hf_config()
  setup = policy_setup.build_setup(spec_of(cfg))
  expected = hf_checkpoint.model_config_from_hf(hf_checkpoint.read_hf_config(cfg.init.hf_checkpoint))
  assert setup.model_cfg == expected and setup.model_cfg.vision is None
  assert setup.example_kwargs == {"image_size": 0, "num_frames": 0}
  tok = setup.tokenizer
  assert tok.decode([tok.eos_id]) == ""  # decoding stops at the chat end token ...
  assert tok.eos_id not in policy_setup.never_generated_ids(tok)  # ... which is never banned
  assert tok.pad_id in policy_setup.never_generated_ids(tok)
  held_out = policy_setup.held_out_sets(spec_of(cfg), setup)
  assert {k: len(v) for k, v in held_out.items()} == {"math": 2, "science": 2}
  assert held_out["science"][0].verifier == "choice"
  batch = setup.encode_prompts(held_out["math"])
  assert batch.frames is None and batch.tokens.shape == (2, cfg.data.max_prompt_len)
  row = batch.tokens[0][batch.mask[0]].tolist()
  assert row == tok.prompt_token_ids(held_out["math"][0].question)
  rendered = tok.render_chat([{"role": "user", "content": held_out["math"][0].question}])
  assert row == tok.encode(rendered)


def test_a_record_longer_than_max_prompt_len_is_named():
  cfg = hf_config()
  cfg.data.max_prompt_len = 12
  with pytest.raises(ValueError, match=r"math_train\.jsonl:1 \(id m1\): the prompt needs \d+ tokens"):
    policy_setup.build_setup(spec_of(cfg))


def test_base_policy_is_the_checkpoint():
  cfg = hf_config()
  setup = policy_setup.build_setup(spec_of(cfg))
  params, loaded = warm_start.get_base_policy(spec_of(cfg), setup)
  assert loaded
  _, reference = hf_checkpoint.load_qwen3(cfg.init.hf_checkpoint)
  for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  assert not os.path.exists(os.path.join(cfg.workdir, "base_policy"))  # no SFT happened


def test_main_run_evaluates_the_checkpoint_on_record_files(tmp_path):
  from copd_jax import main
  cfg = hf_config()
  cfg.method, cfg.num_experts, cfg.workdir = "base", 1, str(tmp_path / "run")
  summary = main.run(cfg)
  for cap in ("math", "science"):
    assert 0.0 <= summary[f"accuracy/{cap}"] <= 1.0
    assert summary[f"response_chars/{cap}"] >= 0.0
  assert summary["base_policy_loaded"] is True


def test_copd_micro_run_from_checkpoint_and_records(tmp_path):
  from copd_jax import main
  cfg = hf_config()
  cfg.workdir = str(tmp_path / "copd")
  summary = main.run(cfg)
  assert summary["method"] == "copd"
  assert set(summary["branches"]) == {"math", "science"}
  for key in ("accuracy/math", "accuracy/science", "accuracy/overall"):
    assert 0.0 <= summary["final"][key] <= 1.0
  with open(os.path.join(cfg.workdir, "metrics.jsonl")) as f:
    logged = set().union(*(json.loads(line) for line in f))
  assert any(k.endswith("opd/delta_mean") for k in logged), "the run must include an OPD step"

  # The merged model goes back out as a HF checkpoint that loads with the same logits.
  from copd_jax import export as export_hf
  from copd_jax.models import decoder as model_lib
  out = str(tmp_path / "exported")
  export_hf.export_run(cfg.workdir, out, dtype="float32")
  _, model_cfg, merged = export_hf.load_run_policy(cfg.workdir)
  reloaded_cfg, reloaded = hf_checkpoint.load_qwen3(out)
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  tokens = np.array([[5, 9, 17, 33, 2]], np.int32)
  mask = np.ones_like(tokens, bool)
  positions = model_lib.positions_from_mask(mask)
  logits = lambda p, c: model_lib.logits_from_hidden(
      model_lib.forward_hidden(p, c, tokens, positions, mask, None), model_lib.lm_head(p, c))
  np.testing.assert_allclose(logits(reloaded, reloaded_cfg), logits(merged, model_cfg),
                             rtol=1e-5, atol=1e-5)
