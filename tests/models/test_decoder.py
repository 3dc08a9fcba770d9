"""The policy model: shapes, parameter count, masking, rotary positions, vision splicing."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny_model import IMG, tiny_config

from copd_jax.models import decoder as M, layers, model_config, toy_vision


@pytest.fixture(scope="module")
def cfg():
  return tiny_config()


@pytest.fixture(scope="module")
def params(cfg):
  return M.init_params(cfg, jax.random.key(0))


def closed_form_param_count(cfg: model_config.ModelConfig) -> int:
  d, hd, m = cfg.d_model, cfg.head_dim, cfg.mlp_dim
  attn = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 2 * hd
  layer = attn + 3 * d * m + 2 * d
  total = cfg.vocab_size * d + cfg.num_layers * layer + d
  if not cfg.tie_embeddings:
    total += d * cfg.vocab_size
  if cfg.vision is not None:
    v = cfg.vision
    w = v.width
    block = 2 * 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * v.mlp_dim + v.mlp_dim) + (
        v.mlp_dim * w + w)
    total += (v.patch_dim * w + w) + v.num_tokens * w + v.depth * block
    total += 2 * w + (w * d + d) + (d * d + d)  # projector: LayerNorm + 2-layer MLP
  return total


def abstract_params(cfg):
  return jax.eval_shape(lambda key: M.init_params(cfg, key), jax.random.key(0))


def random_clip(key, batch, vcfg):
  return jax.random.uniform(key, (batch, vcfg.num_frames, vcfg.image_size, vcfg.image_size,
                                  vcfg.channels))


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False), dict(vision=None)])
def test_param_count_matches_closed_form(overrides):
  cfg = tiny_config(**overrides)
  params = abstract_params(cfg)  # shapes only: no compile, no compute
  assert M.count_params(params) == closed_form_param_count(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_param_names_follow_qwen3_layout(cfg, params):
  attn = params["layers_1"]["self_attn"]
  assert attn["q_proj"]["kernel"].shape == (32, 4 * 8)  # [in, out] = HF weight transposed
  assert attn["k_proj"]["kernel"].shape == (32, 2 * 8)
  assert attn["o_proj"]["kernel"].shape == (4 * 8, 32)
  assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (8,)
  mlp = params["layers_0"]["mlp"]
  assert mlp["gate_proj"]["kernel"].shape == mlp["up_proj"]["kernel"].shape == (32, 64)
  assert mlp["down_proj"]["kernel"].shape == (64, 32)
  assert set(params["layers_0"]) == {"input_layernorm", "self_attn",
                                     "post_attention_layernorm", "mlp"}
  assert params["embed_tokens"]["embedding"].shape == (48, 32)
  assert "lm_head" not in params and "visual" in params


def test_lm_head_is_tied_embedding_or_own_kernel(cfg, params):
  np.testing.assert_array_equal(M.lm_head(params, cfg), params["embed_tokens"]["embedding"].T)
  untied = tiny_config(tie_embeddings=False)
  p2 = abstract_params(untied)
  assert M.lm_head(p2, untied).shape == (32, 48)
  assert M.lm_head(p2, untied) is p2["lm_head"]["kernel"]


def test_forward_shapes_and_logits(cfg, params):
  tokens = jax.random.randint(jax.random.key(1), (3, 7), 4, 48)
  mask = jnp.ones((3, 7), bool)
  hidden = M.forward_hidden(params, cfg, tokens, M.positions_from_mask(mask), mask)
  assert hidden.shape == (3, 7, 32) and hidden.dtype == jnp.float32
  logits = M.logits_from_hidden(hidden, M.lm_head(params, cfg))
  assert logits.shape == (3, 7, 48) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Final RMSNorm with unit scale: every hidden vector has unit RMS.
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(hidden), -1)), 1.0, rtol=1e-4)


def test_positions_from_mask_ignore_left_padding():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(M.positions_from_mask(mask),
                                [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])


def test_left_padding_does_not_change_outputs(cfg, params):
  prompt = jax.random.randint(jax.random.key(2), (5,), 4, 48)

  def run(num_pad, pad_token):
    tokens = jnp.concatenate([jnp.full((num_pad,), pad_token), prompt])[None]
    mask = jnp.arange(num_pad + 5)[None] >= num_pad
    return M.forward_hidden(params, cfg, tokens, M.positions_from_mask(mask), mask)[0,
                                                                                     num_pad:]
  reference = run(0, 0)
  # More padding, and garbage in the pad slots, must not change the real positions.
  np.testing.assert_allclose(run(3, 0), reference, atol=1e-5)
  np.testing.assert_allclose(run(6, 17), reference, atol=1e-5)


def test_attention_is_causal(cfg, params):
  tokens = jax.random.randint(jax.random.key(3), (1, 8), 4, 48)
  mask = jnp.ones((1, 8), bool)
  pos = M.positions_from_mask(mask)
  base = M.forward_hidden(params, cfg, tokens, pos, mask)
  changed = M.forward_hidden(params, cfg, tokens.at[0, 5].set(40), pos, mask)
  np.testing.assert_allclose(changed[:, :5], base[:, :5], atol=1e-6)
  assert np.abs(changed[:, 5:] - base[:, 5:]).max() > 1e-3


def test_rope_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(4), (2, 1, 1, 1, 8))

  def score(pq, pk):
    rq = layers.apply_rope(q, jnp.array([[pq]]), 10000.0)
    rk = layers.apply_rope(k, jnp.array([[pk]]), 10000.0)
    return float(jnp.sum(rq * rk))
  assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
  assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
  # Position 0 is the identity rotation.
  np.testing.assert_allclose(layers.apply_rope(q, jnp.array([[0]]), 10000.0), q)


def test_replace_placeholders_in_order():
  embeds = jnp.zeros((2, 6, 4))
  tokens = jnp.array([[1, IMG, 2, IMG, IMG, 5], [1, 2, 4, 5, 6, 7]])
  vision = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) + 1
  out = toy_vision.replace_placeholders(embeds, tokens, vision, IMG)
  np.testing.assert_array_equal(out[0, 1], vision[0, 0])
  np.testing.assert_array_equal(out[0, 3], vision[0, 1])
  np.testing.assert_array_equal(out[0, 4], vision[0, 2])
  np.testing.assert_array_equal(out[0, [0, 2, 5]], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)  # a row without placeholders is untouched


def test_vision_reaches_only_placeholder_rows(cfg, params):
  n = cfg.vision.num_tokens
  text = jax.random.randint(jax.random.key(5), (6,), 4, 48)
  vision_row = jnp.concatenate([text[:2], jnp.full((n,), IMG), text[2:]])
  text_row = jnp.concatenate([jnp.zeros((n,), jnp.int32), text])
  tokens = jnp.stack([vision_row, text_row])
  mask = jnp.stack([jnp.ones(n + 6, bool), jnp.arange(n + 6) >= n])
  pos = M.positions_from_mask(mask)
  clip_a, clip_b = random_clip(jax.random.key(6), 2, cfg.vision), random_clip(
      jax.random.key(7), 2, cfg.vision)
  out_a = M.forward_hidden(params, cfg, tokens, pos, mask, clip_a)
  out_b = M.forward_hidden(params, cfg, tokens, pos, mask, clip_b)
  np.testing.assert_allclose(out_a[1], out_b[1], atol=1e-6)  # text-only row: clip irrelevant
  np.testing.assert_allclose(out_a[0, :2], out_b[0, :2], atol=1e-6)  # before the image
  assert np.abs(out_a[0, 2:] - out_b[0, 2:]).max() > 1e-3  # at and after the image
  # The encoder yields exactly num_tokens embeddings at the LM width.
  embeds = M.Policy(cfg).apply({"params": params}, clip_a, method=lambda m, v: m.visual(v))
  assert embeds.shape == (2, n, cfg.d_model)


def test_clip_to_tubelets_layout():
  vcfg = model_config.VisionConfig(image_size=4, patch_size=2, channels=1, num_frames=2, tubelet=2)
  clip = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(1, 2, 4, 4, 1)
  patches = toy_vision.clip_to_tubelets(clip, vcfg)
  assert patches.shape == (1, vcfg.num_tokens, vcfg.patch_dim) == (1, 4, 8)
  # Tubelet (row 0, col 1): frame 0 pixels then frame 1 pixels of that 2x2 patch.
  np.testing.assert_array_equal(patches[0, 1], [2, 3, 6, 7, 18, 19, 22, 23])


def test_bf16_compute_stays_close_to_f32(params):
  cfg16 = tiny_config(dtype="bfloat16")
  tokens = jax.random.randint(jax.random.key(8), (2, 6), 4, 48)
  mask = jnp.ones((2, 6), bool)
  pos = M.positions_from_mask(mask)
  h32 = M.forward_hidden(params, tiny_config(), tokens, pos, mask)
  h16 = M.forward_hidden(params, cfg16, tokens, pos, mask)
  assert h16.dtype == jnp.float32
  assert np.abs(h16 - h32).max() < 0.1 and np.abs(h16 - h32).max() > 0


def test_cast_matmul_kernels_changes_nothing_but_dtypes(params):
  cfg16 = tiny_config(dtype="bfloat16", tie_embeddings=False)
  p16 = M.init_params(cfg16, jax.random.key(1))
  cast = M.cast_matmul_kernels(p16, cfg16)
  assert cast["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  assert cast["visual"]["patch_embed"]["kernel"].dtype == jnp.bfloat16
  assert cast["lm_head"]["kernel"].dtype == jnp.float32  # logits stay f32
  assert cast["layers_0"]["input_layernorm"]["scale"].dtype == jnp.float32
  tokens = jax.random.randint(jax.random.key(2), (2, 6), 4, 48)
  mask = jnp.ones((2, 6), bool)
  pos = M.positions_from_mask(mask)
  np.testing.assert_array_equal(M.forward_hidden(cast, cfg16, tokens, pos, mask),
                                M.forward_hidden(p16, cfg16, tokens, pos, mask))


def test_config_accepts_dicts_and_configdicts():
  d = dataclasses.asdict(tiny_config())
  cd = ml_collections.ConfigDict(d)
  from_cd = model_config.ModelConfig(**cd.to_dict())
  assert isinstance(from_cd.vision, model_config.VisionConfig)
  assert model_config.ModelConfig.from_dict(cd) == from_cd == tiny_config()
  assert from_cd.vision.num_tokens == 8
  assert model_config.VisionConfig().num_tokens == 32
  hash(from_cd)  # static argument of jit


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=3), "num_heads"),
    (dict(d_model=0), "d_model"),
    (dict(head_dim=7), "head_dim"),
    (dict(dtype="float16"), "dtype"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(image_token_id=48), "image_token_id"),
    (dict(vision=dict(image_size=15, patch_size=8)), "image_size"),
    (dict(vision=dict(num_frames=3, tubelet=2)), "num_frames"),
    (dict(vision=dict(colour=True)), "vision"),
])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    tiny_config(**overrides)


def test_from_dict_rejects_unknown_fields():
  with pytest.raises(ValueError, match="num_expert"):
    model_config.ModelConfig.from_dict(dict(dataclasses.asdict(tiny_config()), num_expert=2))


def test_forward_input_errors(cfg, params):
  tokens = jnp.zeros((2, 5), jnp.int32)
  mask = jnp.ones((2, 5), bool)
  pos = M.positions_from_mask(mask)
  with pytest.raises(ValueError, match="token_mask"):
    M.forward_hidden(params, cfg, tokens, pos, mask[:, :4])
  with pytest.raises(ValueError, match="vision"):
    M.forward_hidden(params, cfg, tokens, pos, mask, jnp.zeros((2, 4, 8, 8, 3)))
  text_cfg = tiny_config(vision=None)
  with pytest.raises(ValueError, match="text-only"):
    M.forward_hidden(M.init_params(text_cfg, jax.random.key(0)), text_cfg, tokens, pos, mask,
                     jnp.zeros((2, 4, 16, 16, 3)))


def _naive_attention(q, k, v, mask):
  """Plain numpy oracle: q [N, T, H, Dh] (scaled), k, v [N, S, H, Dh], mask bool[N, T, S]."""
  scores = np.einsum("nthd,nshd->nhts", q, k)
  scores = np.where(mask[:, None], scores, -np.inf)
  scores = scores - scores.max(-1, keepdims=True)
  weights = np.exp(scores)
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("nhts,nshd->nthd", weights, v)


@pytest.mark.parametrize("block", [0, 3, 4, 16])
def test_query_blocked_attention_matches_a_numpy_oracle(block):
  rng = np.random.default_rng(0)
  n, t, kv, groups, hd = 2, 11, 2, 2, 8
  q = rng.normal(size=(n, t, kv, groups, hd)).astype(np.float32)
  k = rng.normal(size=(n, t, kv, hd)).astype(np.float32)
  v = rng.normal(size=(n, t, kv, hd)).astype(np.float32)
  valid = np.ones((n, t), bool)
  valid[1, :4] = False  # left padding
  mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
  mask[1, :4, 0] = True  # padded queries see one key (their outputs are unused)
  got = M.in_query_blocks(
      lambda qb, qi: M._dense_attention(qb, k, v, jnp.take(mask, qi, axis=1, mode="clip")), q,
      block)
  # The oracle over heads h = (kv head, group): query head h reads kv head h // groups.
  want = _naive_attention(q.reshape(n, t, kv * groups, hd), np.repeat(k, groups, axis=2),
                          np.repeat(v, groups, axis=2), mask)
  np.testing.assert_allclose(np.asarray(got).reshape(n, t, kv * groups, hd), want, atol=1e-5)


def test_attention_block_gives_the_same_model_values_and_gradients(cfg, params):
  blocked = dataclasses.replace(cfg, attention_block=3)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(4, 48, (3, 10)))
  mask = jnp.asarray(np.arange(10)[None] >= np.array([[0], [2], [5]]))
  pos = M.positions_from_mask(mask)
  prompt, prompt_mask, prompt_pos = tokens[:, :6], mask[:, :6], pos[:, :6]
  cont = jnp.asarray(rng.integers(4, 48, (6, 5)))
  cont_pos = jnp.repeat(prompt_mask.sum(1), 2)[:, None] + jnp.arange(5)

  def loss(c, p):
    full = M.forward_hidden(p, c, tokens, pos, mask)
    _, shared = M.forward_hidden_shared_prefix(p, c, prompt, prompt_pos, prompt_mask, None,
                                               cont, cont_pos)
    return jnp.sum(jnp.sin(full) * mask[..., None]) + jnp.sum(jnp.cos(shared))

  for fn in (lambda c: M.forward_hidden(params, c, tokens, pos, mask),
             lambda c: M.forward_hidden_shared_prefix(params, c, prompt, prompt_pos,
                                                      prompt_mask, None, cont, cont_pos)[1]):
    np.testing.assert_allclose(np.asarray(fn(blocked)), np.asarray(fn(cfg)), atol=1e-5)
  grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)  # one program per config
  want = grad(cfg, params)
  got = grad(blocked, params)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)


def test_attention_block_builds_no_whole_sequence_score_matrix(cfg, params):
  t = 97  # a length no other array dimension has
  tokens = jnp.zeros((2, t), jnp.int32)
  mask = jnp.ones((2, t), bool)
  pos = M.positions_from_mask(mask)

  def hlo(c):
    grad = jax.jit(jax.grad(lambda p: jnp.sum(M.forward_hidden(p, c, tokens, pos, mask))))
    return grad.lower(params).compile().as_text()
  assert f"{t},{t}]" in hlo(cfg)  # the dense path does build [.., T, T] scores
  assert f"{t},{t}]" not in hlo(dataclasses.replace(cfg, attention_block=16))


def test_shared_prefix_forward_equals_whole_rows(cfg, params):
  """Each prompt run once for its G continuations == every row [prompt | continuation]."""
  rng = np.random.default_rng(2)
  b, g, p, r = 2, 3, 6, 4
  prompt = rng.integers(4, 48, (b, p))
  prompt_mask = np.arange(p)[None] >= np.array([[0], [2]])
  cont = rng.integers(4, 48, (b * g, r))
  rows = np.concatenate([np.repeat(prompt, g, 0), cont], 1)
  row_mask = np.concatenate([np.repeat(prompt_mask, g, 0), np.ones((b * g, r), bool)], 1)
  row_pos = np.asarray(M.positions_from_mask(jnp.asarray(row_mask)))
  whole = M.forward_hidden(params, cfg, jnp.asarray(rows), jnp.asarray(row_pos),
                           jnp.asarray(row_mask))
  prompt_hidden, cont_hidden = M.forward_hidden_shared_prefix(
      params, cfg, jnp.asarray(prompt), jnp.asarray(row_pos[::g, :p]), jnp.asarray(prompt_mask),
      None, jnp.asarray(cont), jnp.asarray(row_pos[:, p:]))
  np.testing.assert_allclose(np.asarray(cont_hidden), np.asarray(whole[:, p:]), atol=1e-5)
  valid = np.repeat(prompt_mask, g, 0)
  np.testing.assert_allclose(np.asarray(jnp.repeat(prompt_hidden, g, 0))[valid],
                             np.asarray(whole[:, :p])[valid], atol=1e-5)
