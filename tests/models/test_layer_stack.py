"""ModelConfig.scan_layers: the decoder layers under nn.scan over stacked parameters.

Independent oracles: transformers' logits on the committed Qwen3 and Qwen3-VL fixtures
(the Qwen3-VL one with an image, so DeepStack runs inside the scan). The rest compares the
scanned model with the unrolled one on the same weights (stack_layers).
"""
import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paths
from copd_jax import sampling
from copd_jax.models import decoder as M
from copd_jax.models import hf_checkpoint as hfc, layer_stack
from copd_jax.models import qwen3_vl, qwen3_vl_decode, qwen3_vl_import
from tests.tiny_model import IMG, tiny_config

FIXTURES = os.path.join(paths.TESTS, "fixtures", "hf")


def scanned(cfg):
  return dataclasses.replace(cfg, scan_layers=True)


def scanned_vl(cfg):
  return dataclasses.replace(cfg, text=scanned(cfg.text))


@pytest.fixture(scope="module")
def toy():
  cfg = tiny_config(num_layers=3)
  return cfg, M.init_params(cfg, jax.random.key(0))


def toy_batch(cfg, key=1):
  k1, k2 = jax.random.split(jax.random.key(key))
  tokens = jax.random.randint(k1, (2, 12), 4, cfg.vocab_size)
  tokens = tokens.at[0, 2:2 + cfg.vision.num_tokens].set(IMG)
  mask = jnp.ones((2, 12), bool).at[1, :3].set(False)  # row 1 left-padded
  v = cfg.vision
  vision = jax.random.uniform(k2, (2, v.num_frames, v.image_size, v.image_size, v.channels))
  return tokens, M.positions_from_mask(mask), mask, vision


# --------------------------------------------------------------------------- layout


def test_scanned_init_is_the_stacked_layout(toy):
  cfg, params = toy
  stacked = M.init_params(scanned(cfg), jax.random.key(0))
  assert "layers" in stacked and not any(k.startswith("layers_") for k in stacked)
  want = jax.tree.map(lambda x: x.shape, layer_stack.stack_layers(params))
  assert jax.tree.map(lambda x: x.shape, stacked) == want
  assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, 32, 32)
  # every layer gets its own random init (split rngs), not one copy
  q = stacked["layers"]["self_attn"]["q_proj"]["kernel"]
  assert not np.allclose(q[0], q[1])


def test_stack_unstack_round_trip_is_exact(toy):
  _, params = toy
  stacked = layer_stack.stack_layers(params)
  np.testing.assert_array_equal(stacked["layers"]["mlp"]["up_proj"]["kernel"][2],
                                params["layers_2"]["mlp"]["up_proj"]["kernel"])
  back = layer_stack.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # behind an expert axis [S, ...]: layers go second, [S, L, ...]
  experts = jax.tree.map(lambda x: jnp.stack([x, x + 1]), params)
  s = layer_stack.stack_layers(experts, leading_axes=1)
  assert s["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 3, 32, 64)
  np.testing.assert_array_equal(s["layers"]["mlp"]["up_proj"]["kernel"][1, 2],
                                experts["layers_2"]["mlp"]["up_proj"]["kernel"][1])
  jax.tree.map(np.testing.assert_array_equal, layer_stack.unstack_layers(s, leading_axes=1), experts)
  # host (numpy) trees stay numpy
  host = layer_stack.stack_layers(jax.tree.map(np.asarray, params))
  assert isinstance(host["layers"]["mlp"]["up_proj"]["kernel"], np.ndarray)


def test_stack_layers_errors(toy):
  _, params = toy
  with pytest.raises(ValueError, match="already stacked"):
    layer_stack.stack_layers(layer_stack.stack_layers(params))
  gap = {k: v for k, v in params.items() if k != "layers_1"}
  with pytest.raises(ValueError, match="layers_0 .. layers_"):
    layer_stack.stack_layers(gap)
  with pytest.raises(ValueError, match="not stacked"):
    layer_stack.unstack_layers(params)
  assert layer_stack.to_layout(params, False) is params
  assert layer_stack.is_stacked(layer_stack.to_layout(params, True))


def test_scan_layers_config_is_checked():
  with pytest.raises(ValueError, match="scan_layers"):
    tiny_config(scan_layers=1)


# --------------------------------------------------------------------------- the toy policy


@pytest.mark.parametrize("remat", [False, True])
def test_toy_scanned_forward_equals_unrolled(toy, remat):
  cfg, params = toy
  cfg = dataclasses.replace(cfg, remat=remat)
  batch = toy_batch(cfg)
  want = M.forward_hidden(params, cfg, *batch)
  got = M.forward_hidden(layer_stack.stack_layers(params), scanned(cfg), *batch)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  # and not by accident: other layer weights change the output
  other = layer_stack.stack_layers(dict(params, layers_1=params["layers_0"]))
  assert np.abs(M.forward_hidden(other, scanned(cfg), *batch) - want).max() > 1e-3


@pytest.mark.parametrize("remat", [False, True])
def test_toy_scanned_gradients_equal_unrolled(toy, remat):
  cfg, params = toy
  cfg = dataclasses.replace(cfg, remat=remat)
  tokens, positions, mask, vision = toy_batch(cfg)

  def loss(p, c):
    hidden = M.forward_hidden(p, c, tokens, positions, mask, vision)
    logits = M.logits_from_hidden(hidden, M.lm_head(p, c))
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  grad = jax.jit(jax.grad(loss), static_argnums=1)  # as the update runs it: one program
  g_unrolled = grad(params, cfg)
  g_scanned = grad(layer_stack.stack_layers(params), scanned(cfg))
  want = layer_stack.stack_layers(g_unrolled)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               g_scanned, want)
  assert np.abs(g_scanned["layers"]["self_attn"]["q_proj"]["kernel"]).max() > 0


def test_toy_scanned_decode_with_cache_equals_unrolled(toy):
  cfg, params = toy
  tokens, positions, mask, vision = toy_batch(cfg)
  g, slots = 2, 3
  stacked, cfg_s = layer_stack.stack_layers(params), scanned(cfg)
  new = jax.random.randint(jax.random.key(5), (tokens.shape[0] * g, 1), 4, cfg.vocab_size)

  @functools.partial(jax.jit, static_argnums=1)  # as the sampler runs it: one program
  def prefill_and_decode(p, c):
    hidden, prefix_kv = M.prefill(p, c, tokens, positions, mask, vision)
    cache = M.init_decode_cache(prefix_kv, g, slots)
    steps = []
    for step in range(slots):
      pos = jnp.repeat(mask.sum(-1), g)[:, None] + step
      h, kv = M.decode_step(p, c, new + step, pos, mask, cache, step)
      cache = M.write_decode_cache(cache, kv, step)
      steps.append(h)
    return hidden, cache, jnp.concatenate(steps, 1)
  results = [prefill_and_decode(p, c) for p, c in ((params, cfg), (stacked, cfg_s))]
  (h0, cache0, d0), (h1, cache1, d1) = results
  assert len(cache1) == 1 and cache1[0].k.shape == (3, 4, 2, slots, 8)
  np.testing.assert_allclose(h1, h0, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(d1, d0, atol=2e-5, rtol=2e-5)
  for i, layer in enumerate(cache0):  # the scanned cache holds every layer's keys, in order
    np.testing.assert_allclose(cache1[0].k[i], layer.k, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(cache1[0].prefix_v[i], layer.prefix_v, atol=2e-5, rtol=2e-5)


def test_toy_scanned_teacher_scoring_equals_unrolled(toy):
  cfg, params = toy
  tokens, positions, mask, vision = toy_batch(cfg)
  cont = jax.random.randint(jax.random.key(7), (4, 5), 4, cfg.vocab_size)
  cont_pos = jnp.repeat(mask.sum(-1), 2)[:, None] + jnp.arange(5)[None]
  args = (tokens, positions, mask, vision, cont, cont_pos)
  want = M.forward_hidden_shared_prefix(params, cfg, *args)
  got = M.forward_hidden_shared_prefix(layer_stack.stack_layers(params), scanned(cfg), *args)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def assert_scanned_sampler_draws_the_same(params, cfgs, sc, prompts):
  """The sampler (G = 2, one key) on the unrolled model `cfgs[0]` and on its scanned twin
  `cfgs[1]` (stacked params) draws the same tokens, with log-probs within 1e-4."""
  unrolled_cfg, scanned_cfg = cfgs
  want = sampling.generate(params, sampling.Sampler(unrolled_cfg, sc, 2), prompts,
                           jax.random.key(3))
  got = sampling.generate(layer_stack.stack_layers(params),
                          sampling.Sampler(scanned_cfg, sc, 2), prompts, jax.random.key(3))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.raw_logprobs, want.raw_logprobs, atol=1e-4)


def test_toy_scanned_sampler_draws_the_same_tokens(toy):
  cfg, params = toy
  cfg = dataclasses.replace(cfg, dtype="float32")
  tokens, _, mask, vision = toy_batch(cfg)
  sc = sampling.SamplingConfig(max_new_tokens=4, temperature=1.0, stop_token_ids=(1,))
  assert_scanned_sampler_draws_the_same(params, (cfg, scanned(cfg)), sc,
                                         sampling.Prompts(tokens, mask, vision))


# --------------------------------------------------------------------------- Qwen3 (HF)


def test_qwen3_scanned_matches_transformers():
  """Independent oracle: transformers' logits for the committed untied f32 Qwen3."""
  ref = dict(np.load(os.path.join(FIXTURES, "qwen3_tiny", "reference.npz")))
  cfg, params = hfc.load_qwen3(os.path.join(FIXTURES, "qwen3_tiny", "untied_f32"))
  cfg_s, stacked = scanned(cfg), layer_stack.stack_layers(params)
  hidden = M.forward_hidden(stacked, cfg_s, jnp.asarray(ref["tokens"]),
                            jnp.asarray(ref["positions"]), jnp.asarray(ref["mask"]))
  logits = np.asarray(M.logits_from_hidden(hidden, M.lm_head(stacked, cfg_s)))
  mask = ref["mask"].astype(bool)
  np.testing.assert_allclose(logits[mask], ref["logits_untied_f32"][mask], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- Qwen3-VL


@pytest.fixture(scope="module")
def vl():
  directory = os.path.join(FIXTURES, "qwen3_vl_tiny")
  cfg, params = qwen3_vl_import.load_qwen3_vl(directory)
  with np.load(os.path.join(directory, "reference.npz")) as data:
    ref = dict(data)
  return cfg, params, ref


def _vl_image_logits(params, cfg, ref):
  return np.asarray(qwen3_vl.forward(params, cfg, ref["image_input_ids"],
                                     ref["image_attention_mask"],
                                     pixel_values=ref["image_pixel_values"],
                                     image_grid_thw=ref["image_grid_thw"]))


def test_qwen3_vl_scanned_matches_transformers_with_deepstack(vl):
  """Independent oracle: transformers' logits for an image prompt (DeepStack features are
  added inside the scan after the first layers)."""
  cfg, params, ref = vl
  assert len(cfg.vision.deepstack_visual_indexes) >= 1
  stacked = layer_stack.stack_layers(params)
  assert "visual" in stacked and stacked["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == \
      cfg.text.num_layers
  logits = _vl_image_logits(stacked, scanned_vl(cfg), ref)
  mask = ref["image_attention_mask"].astype(bool)
  np.testing.assert_allclose(logits[mask], ref["image_logits"][mask], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logits[mask], _vl_image_logits(params, cfg, ref)[mask],
                             atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def vl4(vl):
  """The fixture with 4 decoder layers: DeepStack feeds only the first two, so the scanned
  body must add nothing after the others. Layers 2 and 3 are layers 0 and 1 plus seeded
  noise (numpy: no random-init program to compile), so no two layers are alike."""
  cfg, params, ref = vl
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=4))
  assert len(cfg.vision.deepstack_visual_indexes) == 2
  rng = np.random.default_rng(2)

  def noisy(x):
    return np.asarray(x) + 0.02 * rng.standard_normal(x.shape).astype(np.float32)
  params = dict(params, layers_2=jax.tree.map(noisy, params["layers_0"]),
                layers_3=jax.tree.map(noisy, params["layers_1"]))
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(lambda: qwen3_vl.init_params(cfg, jax.random.key(0))))
  return cfg, params, ref


def test_qwen3_vl_scanned_forward_equals_unrolled_past_deepstack(vl4):
  cfg, params, ref = vl4
  want = _vl_image_logits(params, cfg, ref)
  got = _vl_image_logits(layer_stack.stack_layers(params), scanned_vl(cfg), ref)
  mask = ref["image_attention_mask"].astype(bool)
  np.testing.assert_allclose(got[mask], want[mask], atol=2e-5, rtol=2e-5)


def _vl_image_batch(cfg, ref):
  """Two LEFT-padded prompts: row 0 with two images, row 1 text only."""
  ids, mask = ref["image_input_ids"], ref["image_attention_mask"]
  return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool), ids, mask


def test_qwen3_vl_scanned_sampler_draws_the_same_tokens(vl4):
  """Prefill (whole-batch vision, DeepStack) and cached decode steps, scanned vs unrolled."""
  cfg, params, ref = vl4
  ids, mask, host_ids, host_mask = _vl_image_batch(cfg, ref)
  vision = qwen3_vl_decode.vision_inputs(cfg, host_ids, host_mask, ref["image_pixel_values"],
                                         ref["image_grid_thw"])
  sc = sampling.SamplingConfig(max_new_tokens=5, temperature=1.0, stop_token_ids=(2,),
                               banned_token_ids=(cfg.image_token_id, cfg.video_token_id))
  assert_scanned_sampler_draws_the_same(params, (cfg, scanned_vl(cfg)), sc,
                                         sampling.Prompts(ids, mask, vision))


def test_qwen3_vl_scanned_prompt_media_scoring_and_gradients(vl4):
  """forward_prompts (media padded per prompt, its own DeepStack path) + teacher forcing
  over the cache, and the gradients (vision tower and DeepStack mergers included)."""
  cfg, params, ref = vl4
  ids, mask, host_ids, host_mask = _vl_image_batch(cfg, ref)
  patches = len(ref["image_pixel_values"])
  budget = -(-patches // cfg.vision.merge_unit) * cfg.vision.merge_unit
  media = qwen3_vl_decode.prompt_media(
      cfg, host_ids, host_mask,
      [dict(pixel_values=ref["image_pixel_values"], image_grid_thw=ref["image_grid_thw"]), {}],
      budget)
  cont = jax.random.randint(jax.random.key(4), (4, 3), 3, 90)

  def loss(p, c, ids, mask, media, cont):
    prompt_hidden, hidden = qwen3_vl_decode.forward_hidden_shared_prefix(p, c, ids, mask,
                                                                         media, cont)
    head = qwen3_vl.lm_head(p, c)
    return (jnp.where(mask[..., None], M.logits_from_hidden(prompt_hidden, head), 0).std()
            + M.logits_from_hidden(hidden, head).std()), (prompt_hidden, hidden)

  # Jitted, as the update runs them: one program each instead of one per eager op.
  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  cfg_s, stacked = scanned_vl(cfg), layer_stack.stack_layers(params)
  (_, want), g_want = value_and_grad(params, cfg, ids, mask, media, cont)
  (_, got), g_got = value_and_grad(stacked, cfg_s, ids, mask, media, cont)
  np.testing.assert_allclose(np.asarray(got[0])[np.asarray(mask)],
                             np.asarray(want[0])[np.asarray(mask)], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(got[1], want[1], atol=2e-5, rtol=2e-5)
  g_want = layer_stack.stack_layers(g_want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=2e-4),
               g_got, g_want)
  merger = g_got["visual"]["deepstack_merger_list_0"]["linear_fc2"]["kernel"]
  assert np.abs(merger).max() > 0  # DeepStack reaches the loss through the scan


# --------------------------------------------------------------------------- import / export


def test_export_unstacks_scanned_params(tmp_path, vl):
  """HF export of scanned params writes what the unrolled export writes (and reads back)."""
  from copd_jax.models import qwen3_vl_export
  cfg, params, _ = vl
  want = qwen3_vl_export.named_hf_arrays(params, cfg)
  got = qwen3_vl_export.named_hf_arrays(layer_stack.stack_layers(params), scanned_vl(cfg))
  assert [n for n, _ in got] == [n for n, _ in want]
  for (_, a), (_, b) in zip(got, want):
    np.testing.assert_array_equal(a, b)

  cfg3, params3 = hfc.load_qwen3(os.path.join(FIXTURES, "qwen3_tiny", "untied_f32"))
  hfc.export_qwen3(str(tmp_path / "scanned"), layer_stack.stack_layers(params3), scanned(cfg3),
                   dtype="float32")
  cfg_back, back = hfc.load_qwen3(str(tmp_path / "scanned"))
  assert cfg_back == cfg3
  jax.tree.map(np.testing.assert_array_equal, back, params3)


def test_policy_setup_stacks_imported_params(toy):
  from copd_jax import policy_setup
  cfg, params = toy
  stacked = policy_setup.to_model_layout(params, scanned(cfg))
  assert layer_stack.is_stacked(stacked)
  assert policy_setup.to_model_layout(stacked, cfg)["layers_1"] is not None


@pytest.mark.parametrize("remat", [False, True])
def test_remat_applies_inside_the_scan(toy, remat):
  """config.model.remat rematerialises the layer body inside the scan (a checkpoint in
  the scanned jaxpr), and only when asked."""
  cfg, params = toy
  cfg = scanned(dataclasses.replace(cfg, remat=remat))
  tokens, positions, mask, vision = toy_batch(cfg)
  text = str(jax.make_jaxpr(lambda p: policy_hidden(p, cfg, tokens, positions, mask))(
      layer_stack.stack_layers(params)))
  body = text[text.index("scan["):]
  assert bool(re.search(r"\b(remat2|checkpoint)\[", body)) == remat


def policy_hidden(params, cfg, tokens, positions, mask):
  return M.Policy(cfg).apply({"params": params}, tokens, positions, mask)[0]
