"""The KV-cache sampler against full recompute, its randomness, masks and re-scoring."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import IMG, one_device_run, tiny_config

from copd_jax import sampling as S
from copd_jax.models import decoder as M, stacked as X
from copd_jax.rl import rows as rows_lib

R = 6  # new tokens


@pytest.fixture(scope="module")
def cfg():
  return tiny_config()


@pytest.fixture(scope="module")
def params(cfg):
  return M.init_params(cfg, jax.random.key(0))


def left_padded(key, lengths, width, vocab=48):
  """Random prompts (ids >= 4, no placeholders) left-padded to `width`."""
  tokens = jax.random.randint(key, (len(lengths), width), 4, vocab)
  mask = jnp.arange(width)[None, :] >= (width - jnp.asarray(lengths))[:, None]
  return jnp.where(mask, tokens, 0), mask


@pytest.fixture(scope="module")
def prompts():
  return left_padded(jax.random.key(1), [5, 8, 3], 8)


def sampled(**kw):
  return S.SamplingConfig(max_new_tokens=R, **kw)


# Few distinct static configs, so the tests share compiled samplers.
GREEDY = sampled(greedy=True)
TRUNCATED = sampled(temperature=0.7, top_k=5, top_p=0.9)
STOPS = tuple(range(4, 30))  # over half the vocabulary: most rows stop early
WITH_STOPS = sampled(temperature=1.5, stop_token_ids=STOPS)
G = 2

_jit_prefill = jax.jit(M.prefill, static_argnames=("cfg",))
_jit_decode_step = jax.jit(M.decode_step, static_argnames=("cfg",))


@pytest.fixture(scope="module")
def stop_rollout(cfg, params, prompts):
  tokens, mask = prompts
  return S.generate(params,
                    S.Sampler(cfg, WITH_STOPS, G),
                    S.Prompts(tokens, mask, None), jax.random.key(12))


def test_cached_decode_logits_equal_full_forward(cfg, params):
  """Prefill + cached steps (prefix shared by G rows) reproduce a full forward's logits."""
  g, p, steps = 2, 7, 3  # prefill 7 columns, then feed columns 7..9 (one, then two at once)
  tokens, mask = left_padded(jax.random.key(2), [4, 7], 10)
  tokens = jnp.repeat(tokens, g, axis=0)  # rows 2b, 2b+1 share prompt b ...
  tokens = tokens.at[1, p:].set(jnp.array([11, 12, 13]))  # ... but not their responses
  mask = jnp.repeat(mask, g, axis=0)
  head = M.lm_head(params, cfg)
  pos = M.positions_from_mask(mask)
  full = M.logits_from_hidden(M.forward_hidden(params, cfg, tokens, pos, mask), head)
  prompt_tokens, prompt_mask = tokens[::g, :p], mask[::g, :p]
  hidden, kv = _jit_prefill(params, cfg, prompt_tokens, pos[::g, :p], prompt_mask)
  np.testing.assert_allclose(M.logits_from_hidden(hidden, head)[:, -1], full[::g, p - 1],
                             atol=1e-5)
  cache = M.init_decode_cache(kv, g, steps)
  assert cache[0].prefix_k.shape[0] == 2 and cache[0].k.shape[:3] == (4, cfg.num_kv_heads, steps)
  hidden, new_kv = _jit_decode_step(params, cfg, tokens[:, p:p + 1], pos[:, p:p + 1],
                                    prompt_mask, cache, 0)
  np.testing.assert_allclose(M.logits_from_hidden(hidden[:, 0], head), full[:, p], atol=1e-5)
  cache = M.write_decode_cache(cache, new_kv, 0)
  hidden, new_kv = _jit_decode_step(params, cfg, tokens[:, p + 1:], pos[:, p + 1:],
                                    prompt_mask, cache, 1)  # two tokens at once
  np.testing.assert_allclose(M.logits_from_hidden(hidden, head), full[:, p + 1:], atol=1e-5)
  cache = M.write_decode_cache(cache, new_kv, 1)
  # The cache now holds exactly the keys a prefill of all ten columns would compute.
  _, all_kv = _jit_prefill(params, cfg, tokens, pos, mask)
  np.testing.assert_allclose(cache[1].k, all_kv[1][0][:, :, p:], atol=1e-5)
  np.testing.assert_allclose(cache[1].v, all_kv[1][1][:, :, p:], atol=1e-5)


@pytest.mark.parametrize("sampling", [GREEDY, TRUNCATED], ids=["greedy", "truncated"])
def test_generate_matches_full_recompute(cfg, params, prompts, sampling):
  tokens, mask = prompts
  key = jax.random.key(3)
  sampler, batch = S.Sampler(cfg, sampling, G), S.Prompts(tokens, mask, None)
  cached = S.generate(params, sampler, batch, key)
  recomputed = S.generate_by_recompute(params, sampler, batch, key)
  assert cached.tokens.shape == (3, G, R)
  np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
  np.testing.assert_allclose(cached.logprobs, recomputed.logprobs, atol=1e-5)
  np.testing.assert_allclose(cached.raw_logprobs, recomputed.raw_logprobs, atol=1e-5)
  np.testing.assert_array_equal(cached.mask, recomputed.mask)


def test_generate_with_vision_matches_full_recompute(cfg, params):
  n = cfg.vision.num_tokens
  text, _ = left_padded(jax.random.key(4), [4, 4], 4)
  tokens = jnp.concatenate([jnp.full((2, n), IMG), text], axis=1)
  tokens = tokens.at[1, :n].set(0)  # row 1 is a text prompt, left-padded
  mask = jnp.ones(tokens.shape, bool).at[1, :n].set(False)
  clip = jax.random.uniform(jax.random.key(5), (2, 4, 16, 16, 3))
  sampler = S.Sampler(cfg, GREEDY, G)
  cached = S.generate(params, sampler, S.Prompts(tokens, mask, clip), jax.random.key(0))
  recomputed = S.generate_by_recompute(params, sampler, S.Prompts(tokens, mask, clip),
                                       jax.random.key(0))
  np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
  np.testing.assert_allclose(cached.raw_logprobs, recomputed.raw_logprobs, atol=1e-5)
  other = S.generate(params, sampler, S.Prompts(tokens, mask, clip[::-1]), jax.random.key(0))
  np.testing.assert_allclose(other.raw_logprobs[1], cached.raw_logprobs[1], atol=1e-5)
  assert np.abs(other.raw_logprobs[0] - cached.raw_logprobs[0]).max() > 1e-4


def test_sampling_is_reproducible_per_key(cfg, params, prompts):
  tokens, mask = prompts
  sampler, batch = S.Sampler(cfg, TRUNCATED, G), S.Prompts(tokens, mask, None)
  a = S.generate(params, sampler, batch, jax.random.key(7))
  b = S.generate(params, sampler, batch, jax.random.key(7))
  c = S.generate(params, sampler, batch, jax.random.key(8))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert np.any(np.asarray(a.tokens) != np.asarray(c.tokens))
  # The G samples of a prompt differ from each other (each row draws its own noise).
  assert np.any(np.asarray(a.tokens[:, 0]) != np.asarray(a.tokens[:, 1]))


def test_greedy_samples_share_the_prefix(cfg, params, prompts):
  """G greedy samples from one shared prefill all equal the G=1 greedy answer."""
  tokens, mask = prompts
  g1 = S.generate(params,
                  S.Sampler(cfg, GREEDY, 1),
                  S.Prompts(tokens, mask, None), jax.random.key(0))
  g2 = S.generate(params,
                  S.Sampler(cfg, GREEDY, G),
                  S.Prompts(tokens, mask, None), jax.random.key(1))
  np.testing.assert_array_equal(g2.tokens, jnp.repeat(g1.tokens, G, axis=1))
  np.testing.assert_allclose(g2.raw_logprobs, jnp.repeat(g1.raw_logprobs, G, axis=1),
                             atol=1e-6)


def test_top_k_one_equals_greedy(cfg, params, prompts):
  tokens, mask = prompts
  greedy = S.generate(params,
                      S.Sampler(cfg, GREEDY, G),
                      S.Prompts(tokens, mask, None), jax.random.key(0))
  top1 = S.generate(params,
                    S.Sampler(cfg, sampled(top_k=1, temperature=1.3), G),
                    S.Prompts(tokens, mask, None), jax.random.key(5))
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  np.testing.assert_allclose(top1.raw_logprobs, greedy.raw_logprobs, atol=1e-6)
  # logprobs are at the sampling temperature, raw_logprobs at temperature 1.
  assert np.abs(top1.logprobs - greedy.logprobs).max() > 1e-4


def test_more_left_padding_gives_the_same_rollout(cfg, params, prompts):
  tokens, mask = prompts
  wider_tokens = jnp.pad(tokens, ((0, 0), (4, 0)))
  wider_mask = jnp.pad(mask, ((0, 0), (4, 0)))
  sampler = S.Sampler(cfg, TRUNCATED, G)
  a = S.generate(params, sampler, S.Prompts(tokens, mask, None), jax.random.key(11))
  b = S.generate(params, sampler, S.Prompts(wider_tokens, wider_mask, None),
                 jax.random.key(11))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_stop_tokens_end_the_mask(stop_rollout):
  ro, stops = stop_rollout, STOPS
  toks, m = np.asarray(ro.tokens).reshape(-1, R), np.asarray(ro.mask).reshape(-1, R)
  finished = np.asarray(ro.finished).reshape(-1)
  assert finished.any() and m.min() == 0
  for row_tokens, row_mask, done in zip(toks, m, finished):
    is_stop = np.isin(row_tokens, stops) & (row_mask > 0)
    length = int(row_mask.sum())
    np.testing.assert_array_equal(row_mask, np.arange(R) < length)  # a prefix of ones
    if done:
      assert is_stop[length - 1] and not is_stop[:length - 1].any()
    else:
      assert length == R and not is_stop.any()
    assert np.all(row_tokens[length:] == S.PAD_ID)
  np.testing.assert_array_equal(ro.lengths, np.asarray(ro.mask).sum(-1))
  assert np.all(np.asarray(ro.logprobs)[np.asarray(ro.mask) == 0] == 0)
  assert np.all(np.asarray(ro.logprobs)[np.asarray(ro.mask) > 0] < 0)


def test_rescoring_a_rollout_reproduces_its_logprobs(cfg, params, prompts, stop_rollout):
  """Teacher forcing through forward_hidden gives the sampler's raw log-probs."""
  tokens, mask = prompts
  ro = stop_rollout
  seq, pos, seq_mask, response_mask = rows_lib.rollout_to_sequences(tokens, mask, ro)
  n, t = 3 * G, 8 + R
  assert seq.shape == pos.shape == seq_mask.shape == response_mask.shape == (n, t)
  np.testing.assert_array_equal(response_mask.sum(-1), ro.lengths.reshape(-1))
  logits = M.logits_from_hidden(M.forward_hidden(params, cfg, seq, pos, seq_mask),
                                M.lm_head(params, cfg))
  targets = rows_lib.next_token_targets(seq)
  rescored = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  expected = rows_lib.align_response_values(ro.raw_logprobs, 8)
  np.testing.assert_allclose(rescored * response_mask, expected, atol=1e-5)
  tempered = jnp.take_along_axis(jax.nn.log_softmax(logits / 1.5), targets[..., None], -1)
  np.testing.assert_allclose(tempered[..., 0] * response_mask,
                             rows_lib.align_response_values(ro.logprobs, 8), atol=1e-5)


def test_process_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
  kept = lambda **kw: np.isfinite(  # noqa: E731
      S.process_logits(logits, S.SamplingConfig(max_new_tokens=1, **kw)))[0].tolist()
  assert kept(top_k=2) == [True, True, False, False]
  assert kept(top_p=0.5) == [True, False, False, False]
  assert kept(top_p=0.7) == [True, True, False, False]
  assert kept(top_p=0.8) == [True, True, True, False]
  assert kept() == [True] * 4
  np.testing.assert_allclose(S.process_logits(logits, S.SamplingConfig(1, temperature=2.0)),
                             logits / 2.0)


def test_stacked_generate_equals_each_expert(cfg, params, prompts):
  # Two different experts without a second init: scale expert 1's embedding.
  stacked = X.broadcast_params(params, 2)
  stacked["embed_tokens"]["embedding"] = stacked["embed_tokens"]["embedding"].at[1].multiply(2.0)
  tokens, mask = prompts
  e_tokens = jnp.stack([tokens, tokens[::-1]])
  e_mask = jnp.stack([mask, mask[::-1]])
  keys = jax.random.split(jax.random.key(15), 2)
  sampler = S.Sampler(cfg, WITH_STOPS, G)
  out = S.stacked_generate(one_device_run(cfg), stacked, sampler,
                           S.Prompts(e_tokens, e_mask, None), keys)
  assert out.tokens.shape == (2, 3, G, R) and out.lengths.shape == (2, 3, G)
  for k in range(2):
    own = S.generate(X.take_expert(stacked, k), sampler,
                     S.Prompts(e_tokens[k], e_mask[k], None), keys[k])
    np.testing.assert_array_equal(out.tokens[k], own.tokens)
    np.testing.assert_allclose(out.raw_logprobs[k], own.raw_logprobs, atol=1e-5)
    np.testing.assert_array_equal(out.mask[k], own.mask)


def test_bf16_generation_runs(params, prompts):
  cfg16 = tiny_config(dtype="bfloat16")
  tokens, mask = prompts
  ro = S.generate(params,
                  S.Sampler(cfg16, TRUNCATED, G),
                  S.Prompts(tokens, mask, None), jax.random.key(0))
  assert np.all(np.isfinite(ro.raw_logprobs)) and np.all(np.asarray(ro.raw_logprobs) <= 0)


@pytest.mark.parametrize("kw, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, temperature=0.0), "temperature"),
    (dict(max_new_tokens=4, top_k=-1), "top_k"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(max_new_tokens=4, greedy="yes"), "greedy"),
])
def test_sampling_config_errors_name_the_field(kw, field):
  with pytest.raises(ValueError, match=field):
    S.SamplingConfig(**kw)


def test_sampling_config_takes_lists():
  s = S.SamplingConfig(max_new_tokens=3, stop_token_ids=[1, 2])
  assert s.stop_token_ids == (1, 2)
  hash(s)


def test_generate_argument_errors(cfg, params, prompts):
  tokens, mask = prompts
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="left-padded"):
    S.generate(params, S.Sampler(cfg, sampled(), 1), S.Prompts(tokens, mask[:, ::-1], None), key)
  with pytest.raises(ValueError, match="empty prompt"):
    S.generate(params,
               S.Sampler(cfg, sampled(), 1),
               S.Prompts(tokens, mask.at[0].set(False), None), key)
  with pytest.raises(ValueError, match="stop_token_ids"):
    S.generate(params,
               S.Sampler(cfg, sampled(stop_token_ids=(48,)), 1),
               S.Prompts(tokens, mask, None), key)
  with pytest.raises(ValueError, match="num_samples"):
    S.generate(params, S.Sampler(cfg, sampled(), 0), S.Prompts(tokens, mask, None), key)
  with pytest.raises(ValueError, match="prompt_mask"):
    S.generate(params, S.Sampler(cfg, sampled(), 1), S.Prompts(tokens, mask[:, 1:], None), key)
  with pytest.raises(ValueError, match="vision"):
    S.generate(params,
               S.Sampler(cfg, sampled(), 1),
               S.Prompts(tokens, mask, jnp.zeros((3, 2, 16, 16, 3))), key)
  with pytest.raises(ValueError, match="keys"):
    S.stacked_generate(one_device_run(cfg), X.broadcast_params(params, 2),
                       S.Sampler(cfg, sampled(), 1),
                       S.Prompts(tokens[None].repeat(2, 0), mask[None].repeat(2, 0), None),
                       jax.random.split(key, 3))


def test_rollout_is_a_pytree(stop_rollout):
  ro = stop_rollout
  leaves = jax.tree_util.tree_leaves(ro)
  assert len(leaves) == len(dataclasses.fields(S.Rollout))
  assert ro.lengths.dtype == jnp.int32 and ro.mask.dtype == jnp.float32
