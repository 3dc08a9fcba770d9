"""LoRA branches (copd_jax/models/lora.py): the forward against weights built by hand in
numpy, the weight-space merge and the exact rank-N*r merged adapter, config errors, rank 0,
and the merged model's Hugging Face export round trip (toy Qwen3 fixture)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paths
from copd_jax import config_lib, default_config
from copd_jax.models import decoder as M, hf_checkpoint as hfc, lora, stacked
from tiny_model import tiny_config

UNTIED = os.path.join(paths.TESTS, "fixtures", "hf", "qwen3_tiny", "untied_f32")


def random_branches(base, num, rank=4, alpha=8.0, seed=0, targets=lora.DEFAULT_TARGETS):
  """LoRA branches on base with random A AND random (non-zero) B."""
  spec = lora.LoraSpec(rank=rank, alpha=alpha, targets=tuple(targets))
  branches = stacked.initial_branches(base, num, spec, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(branches.adapters)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return branches.replace(adapters=jax.tree.unflatten(tree, leaves))


def numpy_effective(base, adapters_k, scale):
  """Branch k's full weights by hand: kernel [in, out] + scale * (B @ A).T per target."""
  out = jax.tree.map(np.asarray, base)
  for layer, modules in adapters_k.items():
    for module, projections in modules.items():
      for name, ab in projections.items():
        a, b = np.asarray(ab["lora_a"], np.float64), np.asarray(ab["lora_b"], np.float64)
        kernel = out[layer][module][name]["kernel"]
        out[layer][module][name] = dict(
            out[layer][module][name], kernel=(kernel + scale * (b @ a).T).astype(np.float32))
  return out


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config(vision=None)
  return cfg, M.init_params(cfg, jax.random.key(0))


def rows(cfg, n=2, t=7, seed=3):
  tokens = jax.random.randint(jax.random.key(seed), (n, t), 4, cfg.vocab_size)
  mask = jnp.ones((n, t), bool).at[0, :2].set(False)  # one left-padded row
  return tokens, M.positions_from_mask(mask), mask


def test_a_branch_computes_the_base_plus_its_low_rank_term(tiny):
  cfg, base = tiny
  branches = random_branches(base, 3)
  tokens, positions, mask = rows(cfg)
  for k in range(3):
    adapters_k = jax.tree.map(lambda x, k=k: x[k], branches.adapters)
    want = M.forward_hidden(numpy_effective(base, adapters_k, branches.scale), cfg, tokens,
                            positions, mask)
    got = M.forward_hidden(lora.take_branch(branches, k), cfg, tokens, positions, mask)
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], atol=2e-5)
  # B = 0 at init: every branch computes the base (up to float rounding: XLA may fuse
  # the base and low-rank matmuls into one dot).
  fresh = stacked.initial_branches(base, 2, lora.LoraSpec(rank=4), jax.random.key(5))
  np.testing.assert_allclose(
      np.asarray(M.forward_hidden(lora.take_branch(fresh, 1), cfg, tokens, positions, mask)),
      np.asarray(M.forward_hidden(base, cfg, tokens, positions, mask)), atol=2e-6, rtol=0)


def test_adapter_shapes_and_only_the_targets_are_adapted(tiny):
  cfg, base = tiny
  branches = random_branches(base, 3, rank=2, targets=("q_proj", "down_proj"))
  layer = branches.adapters["layers_1"]
  assert set(layer) == {"self_attn", "mlp"}
  assert set(layer["self_attn"]) == {"q_proj"} and set(layer["mlp"]) == {"down_proj"}
  assert layer["self_attn"]["q_proj"]["lora_a"].shape == (3, 2, cfg.d_model)
  assert layer["self_attn"]["q_proj"]["lora_b"].shape == (3, cfg.num_heads * cfg.head_dim, 2)
  assert layer["mlp"]["down_proj"]["lora_b"].shape == (3, cfg.d_model, 2)
  np.testing.assert_array_equal(
      stacked.initial_branches(base, 3, lora.LoraSpec(rank=2), jax.random.key(0))
      .adapters["layers_0"]["mlp"]["up_proj"]["lora_b"], 0.0)  # B starts at zero
  # The base is shared: not stacked.
  assert branches.base["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (
      cfg.d_model, cfg.num_heads * cfg.head_dim)
  assert stacked.num_experts(branches) == 3


def test_scanned_layers_take_adapters_with_a_layer_axis(tiny):
  cfg, base = tiny
  scan_cfg = tiny_config(vision=None, scan_layers=True)
  from copd_jax.models import layer_stack
  branches = random_branches(base, 2)
  scanned = lora.LoraBranches(layer_stack.stack_layers(branches.base),
                              layer_stack.stack_layers(branches.adapters, leading_axes=1),
                              branches.scale)
  assert scanned.adapters["layers"]["mlp"]["gate_proj"]["lora_a"].shape == (2, 2, 4, 32)
  tokens, positions, mask = rows(cfg)
  for k in range(2):
    np.testing.assert_allclose(
        np.asarray(M.forward_hidden(lora.take_branch(scanned, k), scan_cfg, tokens, positions,
                                    mask))[mask],
        np.asarray(M.forward_hidden(lora.take_branch(branches, k), cfg, tokens, positions,
                                    mask))[mask], atol=2e-5)


def test_merge_is_the_mean_of_the_effective_weights_and_the_big_adapter_is_exact(tiny):
  cfg, base = tiny
  branches = random_branches(base, 3)
  # By hand, in float64: W + mean_k scale * B_k A_k -- not W + scale * mean(B) mean(A).
  effective = [numpy_effective(base, jax.tree.map(lambda x, k=k: x[k], branches.adapters),
                               branches.scale) for k in range(3)]
  want = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), 0), *effective)
  merged = stacked.merge(branches)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  for got, w in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), w, atol=2e-6, rtol=0)
  q = ("layers_0", "self_attn", "q_proj")
  a = np.asarray(branches.adapters[q[0]][q[1]][q[2]]["lora_a"], np.float64)
  b = np.asarray(branches.adapters[q[0]][q[1]][q[2]]["lora_b"], np.float64)
  product_of_means = (np.asarray(base[q[0]][q[1]][q[2]]["kernel"])
                      + branches.scale * (b.mean(0) @ a.mean(0)).T)
  assert np.abs(product_of_means - want[q[0]][q[1]][q[2]]["kernel"]).max() > 1e-2
  # Weighted merge.
  weighted = stacked.merge(branches, [1.0, 0.0, 3.0])
  want_w = jax.tree.map(lambda x, z: (x + 3 * z) / 4, effective[0], effective[2])
  for got, w in zip(jax.tree.leaves(weighted), jax.tree.leaves(want_w)):
    np.testing.assert_allclose(np.asarray(got), w, atol=2e-6, rtol=0)

  # The merged adapter of rank 3 r reproduces the same weights and the same forward.
  big = lora.merged_adapter(branches, stacked.merge_weights(3, None))
  assert big.adapters[q[0]][q[1]][q[2]]["lora_a"].shape == (1, 3 * 4, cfg.d_model)
  for got, w in zip(jax.tree.leaves(lora.effective_params(lora.take_branch(big, 0))),
                    jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), w, atol=2e-6, rtol=0)
  tokens, positions, mask = rows(cfg)
  np.testing.assert_allclose(
      np.asarray(M.forward_hidden(lora.take_branch(big, 0), cfg, tokens, positions, mask))[mask],
      np.asarray(M.forward_hidden(merged, cfg, tokens, positions, mask))[mask], atol=2e-5)
  # take_expert gives a branch's effective weights.
  for got, w in zip(jax.tree.leaves(stacked.take_expert(branches, 2)),
                    jax.tree.leaves(effective[2])):
    np.testing.assert_allclose(np.asarray(got), w, atol=2e-6, rtol=0)


def test_rank_zero_is_full_copies_as_before(tiny):
  _, base = tiny
  copies = stacked.initial_branches(base, 2, lora.LoraSpec(rank=0), jax.random.key(0))
  assert not lora.is_lora(copies)
  assert jax.tree.structure(copies) == jax.tree.structure(base)
  for got, want in zip(jax.tree.leaves(copies), jax.tree.leaves(stacked.broadcast_params(base, 2))):
    np.testing.assert_array_equal(got, want)
  assert lora.trainable(copies) is copies and lora.branch_axes(copies) == 0
  assert lora.model_params(base) is base  # nothing attached, nothing read
  cfg = default_config.get("copd", "micro")
  assert lora.spec_from_config(cfg) == lora.LoraSpec(rank=0)


@pytest.mark.parametrize("field,value,match", [
    ("rank", -1, r"config\.model\.lora\.rank must be an integer >= 0"),
    ("rank", 33, r"config\.model\.lora\.rank=33 exceeds the smaller dimension 32 of q_proj"),
    ("alpha", 0.0, r"config\.model\.lora\.alpha must be a finite number > 0"),
    ("targets", ("q_proj", "lm_head"), r"config\.model\.lora\.targets has unknown target\(s\) "
                                       r"\['lm_head'\]"),
])
def test_bad_lora_config_is_named(field, value, match):
  cfg = default_config.get("copd", "micro")
  cfg.model.lora[field] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(cfg)


def test_rank_above_a_checkpoint_projection_is_named(tiny):
  _, base = tiny
  with pytest.raises(ValueError, match=r"rank=17 exceeds the smaller dimension 16 of "
                                       r"layers_0/self_attn/k_proj"):
    stacked.initial_branches(base, 2, lora.LoraSpec(rank=17), jax.random.key(0))


def test_merged_lora_model_exports_and_reloads_with_identical_logits(tmp_path):
  cfg, base = hfc.load_qwen3(UNTIED)
  branches = random_branches(base, 2, rank=2, alpha=4.0)
  merged = stacked.merge(branches)
  out = str(tmp_path / "export")
  hfc.export_qwen3(out, merged, cfg, dtype="float32")
  cfg2, reloaded = hfc.load_qwen3(out)
  assert cfg2 == cfg
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
  mask = jnp.ones((2, 6), bool)
  positions = M.positions_from_mask(mask)

  def logits(params):
    hidden = M.forward_hidden(params, cfg, tokens, positions, mask)
    return np.asarray(M.logits_from_hidden(hidden, M.lm_head(params, cfg)))
  np.testing.assert_array_equal(logits(reloaded), logits(merged))
  # The export holds the merge (not the base): its logits are those of the branches'
  # averaged weights, which differ from the base's.
  assert np.abs(logits(reloaded) - logits(base)).max() > 1e-3


def test_qwen3_vl_lora_branches_forward_merge_and_export(tmp_path):
  from copd_jax.models import qwen3_vl_export, qwen3_vl_import
  from test_qwen3_vl_import import FIXTURE, _logits
  cfg, base = qwen3_vl_import.load_qwen3_vl(FIXTURE)
  with np.load(os.path.join(FIXTURE, "reference.npz")) as data:
    ref = dict(data)
  branches = random_branches(base, 2, rank=2, alpha=4.0)
  assert "visual" not in branches.adapters and "layers_0" in branches.adapters  # text only
  # A branch (shared base + its adapter) computes its effective weights' logits.
  lora_logits = _logits(lora.take_branch(branches, 1), cfg, ref, "image")
  full_logits = _logits(stacked.take_expert(branches, 1), cfg, ref, "image")
  mask = ref["image_attention_mask"].astype(bool)
  np.testing.assert_allclose(lora_logits[mask], full_logits[mask], atol=1e-4, rtol=1e-4)
  assert np.abs(full_logits - _logits(base, cfg, ref, "image"))[mask].max() > 1e-3
  # The weight-space merge exports as a normal checkpoint and reloads with the same logits.
  merged = stacked.merge(branches)
  qwen3_vl_export.export_qwen3_vl(str(tmp_path), merged, cfg, source_dir=FIXTURE,
                                  dtype="float32")
  cfg2, back = qwen3_vl_import.load_qwen3_vl(str(tmp_path))
  np.testing.assert_array_equal(_logits(back, cfg2, ref, "image"),
                                _logits(merged, cfg, ref, "image"))
