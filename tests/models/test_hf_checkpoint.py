"""Qwen3 import/export against fixtures made by transformers (experiments/make_hf_fixtures.py).

No torch here: the fixtures hold safetensors checkpoints plus transformers' logits and
tokenizer outputs.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import paths
from copd_jax.data.chat_template import ChatTemplateError
from copd_jax.data.hf_tokenizer import HFTokenizer
from copd_jax.data.tokenizer import REPLACEMENT_CHAR, Tokenizer
from copd_jax.models import decoder as M, hf_checkpoint as hfc

FIXTURES = os.path.join(paths.TESTS, "fixtures", "hf", "qwen3_tiny")
UNTIED = os.path.join(FIXTURES, "untied_f32")
TIED = os.path.join(FIXTURES, "tied_bf16")
TIED_SHARDED = os.path.join(FIXTURES, "tied_bf16_sharded")
TOKENIZER_DIR = os.path.join(FIXTURES, "tokenizer")
ATOL = 1e-4


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FIXTURES, "reference.npz")))


@pytest.fixture(scope="module")
def tokenizer_reference():
  with open(os.path.join(FIXTURES, "tokenizer_reference.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def untied():
  return hfc.load_qwen3(UNTIED)


def our_logits(cfg, params, ref):
  hidden = M.forward_hidden(params, cfg, jnp.asarray(ref["tokens"]), jnp.asarray(ref["positions"]),
                            jnp.asarray(ref["mask"]))
  return np.asarray(M.logits_from_hidden(hidden, M.lm_head(params, cfg)))


def assert_logits_close(ours, theirs, mask):
  # Padded positions carry no meaning (see copd_jax.models.decoder); compare real tokens only.
  np.testing.assert_allclose(ours[mask], theirs[mask], atol=ATOL, rtol=0)


def test_positions_match_the_fixture(reference):
  np.testing.assert_array_equal(M.positions_from_mask(jnp.asarray(reference["mask"])),
                                reference["positions"])


# --------------------------------------------------------------------------- parity


def test_untied_f32_logits_match_transformers(untied, reference):
  cfg, params = untied
  assert not cfg.tie_embeddings and cfg.vision is None
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.head_dim) == (352, 48, 2, 16)
  assert cfg.rope_theta == 1e6
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  ours = our_logits(cfg, params, reference)
  assert np.abs(reference["logits_untied_f32"]).max() > 0.5  # a non-trivial reference
  assert_logits_close(ours, reference["logits_untied_f32"], reference["mask"])


def test_loaded_tree_matches_init_params_structure(untied):
  cfg, params = untied
  fresh = jax.eval_shape(lambda k: M.init_params(cfg, k), jax.random.key(0))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(fresh)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree_util.tree_leaves(fresh)):
    assert a.shape == b.shape, jax.tree_util.keystr(path)


def test_tied_bf16_logits_match_and_sharded_equals_single(reference):
  cfg, params = hfc.load_qwen3(TIED)
  cfg_sharded, params_sharded = hfc.load_qwen3(TIED_SHARDED)
  assert cfg == cfg_sharded and cfg.tie_embeddings and "lm_head" not in params
  assert len(hfc.safetensors_files(TIED_SHARDED)) > 1
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_sharded)):
    np.testing.assert_array_equal(a, b)
  assert_logits_close(our_logits(cfg, params, reference), reference["logits_tied_bf16"],
                      reference["mask"])


def test_bfloat16_param_dtype_keeps_bf16_weights_exact():
  _, f32_params = hfc.load_qwen3(TIED)
  _, bf16_params = hfc.load_qwen3(TIED, param_dtype="bfloat16", dtype="bfloat16")
  for a, b in zip(jax.tree_util.tree_leaves(f32_params), jax.tree_util.tree_leaves(bf16_params)):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))


# --------------------------------------------------------------------------- export


def test_export_round_trip_f32_is_exact(untied, reference, tmp_path):
  cfg, params = untied
  out = str(tmp_path / "export")
  hfc.export_qwen3(out, params, cfg, tokenizer_dir=TOKENIZER_DIR, dtype="float32")
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
  with safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
    assert f.metadata() == {"format": "pt"}
    # HF layout: [out, in], the transpose of our kernel.
    np.testing.assert_array_equal(f.get_tensor("model.layers.0.self_attn.q_proj.weight"),
                                  np.asarray(params["layers_0"]["self_attn"]["q_proj"]["kernel"]).T)
  cfg2, params2 = hfc.load_qwen3(out)
  assert cfg2 == cfg
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    np.testing.assert_array_equal(a, b)
  assert_logits_close(our_logits(cfg2, params2, reference), reference["logits_untied_f32"],
                      reference["mask"])


def test_export_bf16_sharded_round_trip(untied, reference, tmp_path):
  cfg, params = untied
  out = str(tmp_path / "export")
  hfc.export_qwen3(out, params, cfg, dtype="bfloat16", max_shard_bytes=40_000)
  assert len(hfc.safetensors_files(out)) > 2
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  cfg2, params2 = hfc.load_qwen3(out)
  assert cfg2 == cfg
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), b)
  ours = our_logits(cfg2, params2, reference)
  mask = reference["mask"]
  # bf16 weights move the logits a little, but far less than their spread.
  err = np.abs(ours - reference["logits_untied_f32"])[mask].max()
  assert 0 < err < 0.05 * np.abs(reference["logits_untied_f32"]).max()


def test_export_rejects_vision_models_unless_language_model_only(tmp_path):
  from tiny_model import tiny_config
  cfg = tiny_config()
  params = M.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="vision tower"):
    hfc.export_qwen3(str(tmp_path / "a"), params, cfg)
  hfc.export_qwen3(str(tmp_path / "b"), params, cfg, language_model_only=True, dtype="float32")
  cfg2, params2 = hfc.load_qwen3(str(tmp_path / "b"))
  assert cfg2.vision is None and "visual" not in params2
  np.testing.assert_array_equal(params2["norm"]["scale"], params["norm"]["scale"])


def test_export_names_a_param_with_the_wrong_shape(untied, tmp_path):
  cfg, params = untied
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad["layers_1"]["mlp"]["up_proj"]["kernel"] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match="layers_1/mlp/up_proj/kernel"):
    hfc.export_qwen3(str(tmp_path / "x"), bad, cfg)


# --------------------------------------------------------------------------- bad checkpoints


def copy_checkpoint(src, tmp_path):
  dst = str(tmp_path / "ckpt")
  shutil.copytree(src, dst)
  return dst


def rewrite_tensors(path, edit):
  with safe_open(path, framework="np") as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
  ckpt = copy_checkpoint(UNTIED, tmp_path)
  rewrite_tensors(os.path.join(ckpt, "model.safetensors"),
                  lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
  with pytest.raises(hfc.HFCheckpointError, match=r"missing.*model\.layers\.1\.mlp\.down_proj"):
    hfc.load_qwen3(ckpt)


def test_wrong_shape_names_file_and_tensor(tmp_path):
  ckpt = copy_checkpoint(UNTIED, tmp_path)
  path = os.path.join(ckpt, "model.safetensors")
  rewrite_tensors(path, lambda t: t.update({"model.norm.weight": np.ones(47, np.float32)}))
  with pytest.raises(hfc.HFCheckpointError,
                     match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \[47\]"):
    hfc.load_qwen3(ckpt)


def test_unexpected_tensor_is_named_but_inv_freq_is_ignored(tmp_path, reference):
  ckpt = copy_checkpoint(UNTIED, tmp_path)
  path = os.path.join(ckpt, "model.safetensors")
  rewrite_tensors(path, lambda t: t.update(
      {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
  cfg, params = hfc.load_qwen3(ckpt)  # harmless buffer: ignored
  assert_logits_close(our_logits(cfg, params, reference), reference["logits_untied_f32"],
                      reference["mask"])
  rewrite_tensors(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.ones(64, np.float32)}))
  with pytest.raises(hfc.HFCheckpointError, match=r"q_proj\.bias.*model\.safetensors"):
    hfc.load_qwen3(ckpt)


def test_truncated_safetensors_file_is_named(tmp_path):
  ckpt = copy_checkpoint(UNTIED, tmp_path)
  path = os.path.join(ckpt, "model.safetensors")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) - 1000])
  with pytest.raises(hfc.HFCheckpointError, match=r"model\.safetensors: not a readable"):
    hfc.load_qwen3(ckpt)
  with open(path, "wb") as f:
    f.write(data[:6])  # not even a header length
  with pytest.raises(hfc.HFCheckpointError, match=r"model\.safetensors"):
    hfc.load_qwen3(ckpt)


def test_index_naming_a_missing_shard_is_named(tmp_path):
  ckpt = copy_checkpoint(TIED_SHARDED, tmp_path)
  os.remove(os.path.join(ckpt, "model-00002-of-00003.safetensors"))
  with pytest.raises(FileNotFoundError, match="model-00002-of-00003"):
    hfc.load_qwen3(ckpt)


def test_no_weights_at_all_is_reported(tmp_path):
  os.makedirs(tmp_path / "empty")
  shutil.copy(os.path.join(UNTIED, "config.json"), tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hfc.load_qwen3(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def hf_config():
  with open(os.path.join(UNTIED, "config.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}),
    ("use_sliding_window", True),
    ("layer_types", ["full_attention", "sliding_attention"]),
    ("attention_bias", True),
    ("num_experts", 8),
    ("hidden_act", "gelu"),
    ("model_type", "qwen3_moe"),
    ("quantization_config", {"quant_method": "fp8"}),
    ("hidden_size", "48"),
    ("num_key_value_heads", 3),
])
def test_unsupported_config_field_is_named(hf_config, field, value):
  with pytest.raises(hfc.HFCheckpointError, match=field if field != "num_key_value_heads"
                     else "num_heads"):
    hfc.model_config_from_hf(dict(hf_config, **{field: value}))


def test_config_accepts_the_pre_v5_rope_layout(hf_config):
  legacy = {k: v for k, v in hf_config.items() if k not in ("rope_parameters", "layer_types")}
  legacy.update(rope_theta=5e5, rope_scaling=None)
  cfg = hfc.model_config_from_hf(legacy, dtype="bfloat16")
  assert cfg.rope_theta == 5e5 and cfg.dtype == "bfloat16"


def test_exported_config_reads_back(untied):
  cfg, _ = untied
  assert hfc.model_config_from_hf(hfc.hf_config_from_model(cfg)) == cfg


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
  return HFTokenizer(TOKENIZER_DIR, model_vocab_size=352)


def test_tokenizer_implements_the_protocol_with_qwen_specials(tok, tokenizer_reference):
  assert isinstance(tok, Tokenizer)
  assert tokenizer_reference["vocab_size"] == 330
  assert tok.vocab_size == 352  # the model's embedding rows win when larger
  assert tok.eos_id == tok.token_id("<|im_end|>")
  assert tok.pad_id == tok.token_id("<|endoftext|>")
  assert tok.bos_id == tok.pad_id  # Qwen has no BOS
  assert tok.image_id == tok.token_id("<|image_pad|>")
  with pytest.raises(ValueError, match="smaller than the tokenizer"):
    HFTokenizer(TOKENIZER_DIR, model_vocab_size=100)


def test_encode_and_decode_match_transformers(tok, tokenizer_reference):
  for case in tokenizer_reference["strings"]:
    assert tok.encode(case["text"]) == case["ids"], case["text"]
    assert tok.decode(case["ids"]) == case["decoded"], case["text"]


def test_chat_template_matches_transformers(tok, tokenizer_reference):
  for case in tokenizer_reference["chats"]:
    kwargs = {k: v for k, v in case.items() if k not in ("messages", "text", "ids")}
    text = tok.render_chat(case["messages"], **kwargs)
    assert text == case["text"]
    assert tok.encode(text) == case["ids"]


def test_prompt_token_ids_is_the_rendered_user_turn(tok, tokenizer_reference):
  plain, vision = tokenizer_reference["chats"][0], tokenizer_reference["chats"][4]
  assert tok.prompt_token_ids(plain["messages"][0]["content"]) == plain["ids"]
  question = "What colour is the square?"
  ids = tok.prompt_token_ids(question, num_vision_tokens=4)
  assert ids == vision["ids"] and ids.count(tok.image_id) == 4
  thinking_off = HFTokenizer(TOKENIZER_DIR, chat_template_kwargs=dict(enable_thinking=False))
  assert thinking_off.prompt_token_ids("What is 2 + 2?") == tokenizer_reference["chats"][3]["ids"]


def test_decode_stops_at_eos_drops_specials_and_never_raises(tok):
  hello = tok.encode("x = 5")
  ids = [tok.token_id("<|im_start|>")] + hello + [tok.image_id] + hello + [tok.eos_id] + hello
  assert tok.decode(ids) == "x = 5x = 5"
  assert tok.decode(hello + [tok.pad_id] + hello) == "x = 5"  # <|endoftext|> also ends text
  assert tok.decode([340, -3, 10**30, "a", None] + hello) == REPLACEMENT_CHAR * 5 + "x = 5"
  # Plain (non-special) added tokens are text: Qwen3's <think> survives decoding.
  assert tok.decode(tok.encode("<think>hi</think>")) == "<think>hi</think>"


def test_chat_template_errors_are_clear(tok):
  with pytest.raises(ChatTemplateError, match="unknown role: tool"):
    tok.render_chat([{"role": "tool", "content": "x"}])


def test_chat_template_runs_sandboxed(tmp_path):
  shutil.copy(os.path.join(TOKENIZER_DIR, "tokenizer.json"), tmp_path)
  with open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json")) as f:
    config = json.load(f)
  config["chat_template"] = "{{ messages.__class__.__mro__ }}"
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump(config, f)
  evil = HFTokenizer(str(tmp_path))
  with pytest.raises(ChatTemplateError):
    evil.render_chat([{"role": "user", "content": "x"}])
  # chat_template.jinja (how newer transformers saves it) takes precedence.
  (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
  assert HFTokenizer(str(tmp_path)).render_chat([{"role": "user", "content": "x"}]) == "x!"
