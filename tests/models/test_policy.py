"""The Policy contract (copd_jax/models/policy.py) for both implementations, against
expectations computed without the policy objects: Hugging Face's logits of the committed
tiny Qwen3 and Qwen3-VL checkpoints, and for the toy model (tubelet vision, LoRA branch)
a cache-free forward of the module over the whole rows with the branch's weights merged
by lora.effective_params.

What is pinned: prefill then decode_step one token at a time (the sampler's path) gives
the logits of a full forward at the last prompt column and at every continuation token;
shared_prefix_hidden (the scorers' path) gives them for the continuation; lm_head; the
activation constraint reaches the residual stream; equal policies are one static jit
argument."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paths
from copd_jax.models import decoder, hf_checkpoint, lora, qwen3_vl_decode, qwen3_vl_import
from copd_jax.models.policy import Policy, Qwen3VLPolicy, TextPolicy, policy_of
from tiny_model import tiny_config
from test_lora import random_branches

QWEN3_TINY = os.path.join(paths.HF_FIXTURES, "qwen3_tiny")
ATOL = 1e-4  # f32 parity with transformers (as tests/models/test_hf_checkpoint.py)
K = 2  # continuation tokens fed through decode_step


def decoded_logits(policy, params, tokens, mask, media, k=K):
  """f32[B, k+1, V]: the logits of the last prompt column (prefill) and of each of the k
  continuation tokens (tokens[:, -k:]) fed one at a time through decode_step over a cache
  of one sample per prompt. Jitted, as the sampler runs it (one program, not one per op)."""
  return np.asarray(_decoded_logits(policy, params, tokens, mask, media, k))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _decoded_logits(policy, params, tokens, mask, media, k):
  p = tokens.shape[1] - k
  prompt, prompt_mask = tokens[:, :p], mask[:, :p]
  head = policy.lm_head(params)
  hidden, prefix_kv = policy.prefill(params, prompt, prompt_mask, media)
  out = [decoder.logits_from_hidden(hidden[:, -1], head)]
  cache = decoder.init_decode_cache(prefix_kv, 1, k)
  start = policy.first_positions(prompt_mask, media)
  for i in range(k):
    h, new_kv = policy.decode_step(params, tokens[:, p + i:p + i + 1], (start + i)[:, None],
                                   prompt_mask, cache, i)
    cache = decoder.write_decode_cache(cache, new_kv, i)
    out.append(decoder.logits_from_hidden(h[:, 0], head))
  return jnp.stack(out, axis=1)


def scored_logits(policy, params, tokens, mask, media, k=K):
  """f32[B, k, V]: the continuation's own logits by shared_prefix_hidden (G = 1), jitted as
  the scorers run it."""
  return np.asarray(_scored_logits(policy, params, tokens, mask, media, k))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _scored_logits(policy, params, tokens, mask, media, k):
  p = tokens.shape[1] - k
  positions = decoder.positions_from_mask(mask)
  _, hidden = policy.shared_prefix_hidden(params, tokens[:, :p], positions[:, :p], mask[:, :p],
                                          media, tokens[:, p:], positions[:, p:])
  return decoder.logits_from_hidden(hidden, policy.lm_head(params))


def test_both_policies_implement_every_member_of_the_contract():
  members = {n for n in vars(Policy) if not n.startswith("_")} | set(Policy.__annotations__)
  assert {"prefill", "decode_step", "shared_prefix_hidden", "rows_hidden", "lm_head"} <= members
  for cls in (TextPolicy, Qwen3VLPolicy):
    fields = {f.name for f in dataclasses.fields(cls)}
    assert sorted(m for m in members if not hasattr(cls, m) and m not in fields) == [], cls
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # static, hashable


# --------------------------------------------------------------------------- Qwen3 (text)


@pytest.fixture(scope="module")
def qwen3():
  cfg, params = hf_checkpoint.load_qwen3(os.path.join(QWEN3_TINY, "untied_f32"))
  ref = dict(np.load(os.path.join(QWEN3_TINY, "reference.npz")))
  return cfg, params, ref


def test_text_policy_decodes_and_scores_what_transformers_computes(qwen3):
  cfg, params, ref = qwen3
  policy = policy_of(cfg)
  assert isinstance(policy, TextPolicy) and policy.text is cfg
  tokens, mask = jnp.asarray(ref["tokens"]), jnp.asarray(ref["mask"])
  theirs = ref["logits_untied_f32"]  # [B, T, V], left-padded rows
  assert np.abs(theirs).max() > 0.5  # a non-trivial reference
  p = tokens.shape[1] - K
  np.testing.assert_allclose(decoded_logits(policy, params, tokens, mask, None),
                             theirs[:, p - 1:], atol=ATOL, rtol=0)
  np.testing.assert_allclose(scored_logits(policy, params, tokens, mask, None),
                             theirs[:, p:], atol=ATOL, rtol=0)
  whole = policy.rows_hidden(params, tokens, decoder.positions_from_mask(mask), mask, None)
  ours = np.asarray(decoder.logits_from_hidden(whole, policy.lm_head(params)))
  np.testing.assert_allclose(ours[ref["mask"]], theirs[ref["mask"]], atol=ATOL, rtol=0)
  np.testing.assert_array_equal(policy.lm_head(params), params["lm_head"]["kernel"])


# --------------------------------------------------------------------------- Qwen3-VL


@pytest.fixture(scope="module")
def qwen3_vl():
  cfg, params = qwen3_vl_import.load_qwen3_vl(paths.QWEN3_VL_TINY)
  return cfg, params, paths.reference_outputs(paths.QWEN3_VL_TINY)


def test_qwen3_vl_policy_decodes_and_scores_what_transformers_computes(qwen3_vl):
  cfg, params, ref = qwen3_vl
  policy = policy_of(cfg)
  assert isinstance(policy, Qwen3VLPolicy) and policy.text is cfg.text
  ids, mask = ref["image_input_ids"], ref["image_attention_mask"]  # row 0: two images
  p = ids.shape[1] - K
  # The prompts' media and 3-D positions; the continuation is text (positions go on).
  media = qwen3_vl_decode.vision_inputs(cfg, ids[:, :p], mask[:, :p], ref["image_pixel_values"],
                                        ref["image_grid_thw"])
  tokens, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
  theirs = ref["image_logits"]
  assert np.abs(theirs).max() > 0.1
  np.testing.assert_allclose(decoded_logits(policy, params, tokens, mask, media),
                             theirs[:, p - 1:], atol=ATOL, rtol=0)
  np.testing.assert_allclose(scored_logits(policy, params, tokens, mask, media),
                             theirs[:, p:], atol=ATOL, rtol=0)
  with pytest.raises(ValueError, match="prompt length"):
    policy.rows_hidden(params, tokens, None, mask, media)
  assert policy.needs_prompt_len and not TextPolicy(cfg.text).needs_prompt_len


# --------------------------------------------------------------------------- the toy policy


@pytest.fixture(scope="module")
def toy_lora():
  cfg = tiny_config()  # with the tubelet vision tower
  base = decoder.init_params(cfg, jax.random.key(0))
  branch = lora.take_branch(random_branches(base, 2, rank=2), 1)
  return cfg, branch


def toy_rows(cfg, n=2, t=9):
  """Left-padded rows whose prompts hold the image placeholder, and their frames."""
  tokens = jax.random.randint(jax.random.key(3), (n, t), 4, cfg.vocab_size)
  tokens = tokens.at[:, 3].set(cfg.image_token_id)
  mask = jnp.ones((n, t), bool).at[1, :2].set(False)
  v = cfg.vision
  frames = jax.random.uniform(jax.random.key(4), (n, v.num_frames, v.image_size, v.image_size,
                                                  v.channels))
  return tokens, mask, frames


def test_toy_lora_policy_decodes_and_scores_what_a_full_forward_computes(toy_lora):
  cfg, branch = toy_lora
  tokens, mask, frames = toy_rows(cfg)
  # The expectation: the module over whole rows, the branch's adapters merged into W.
  merged = lora.effective_params(branch)
  hidden, _ = decoder.Policy(cfg).apply({"params": merged}, tokens,
                                        decoder.positions_from_mask(mask), mask, frames)
  head = merged["embed_tokens"]["embedding"].T if cfg.tie_embeddings else \
      merged["lm_head"]["kernel"]
  full = np.asarray(jnp.einsum("btd,dv->btv", hidden, head))
  policy = policy_of(cfg)
  p = tokens.shape[1] - K
  np.testing.assert_allclose(decoded_logits(policy, branch, tokens, mask, frames),
                             full[:, p - 1:], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(scored_logits(policy, branch, tokens, mask, frames),
                             full[:, p:], atol=2e-5, rtol=1e-5)
  assert np.abs(full[:, p - 1:] - np.asarray(jnp.einsum(
      "btd,dv->btv", decoder.Policy(cfg).apply({"params": branch.base}, tokens,
                                               decoder.positions_from_mask(mask), mask,
                                               frames)[0], head))[:, p - 1:]).max() > 1e-3


def test_the_constraint_reaches_the_residual_stream_and_nothing_else_sets_it(toy_lora):
  cfg, branch = toy_lora
  tokens, mask, frames = toy_rows(cfg)
  seen = []

  def constrain(x):
    seen.append(x.shape)
    return x
  policy = policy_of(cfg).with_constraint(constrain)
  policy.rows_hidden(branch, tokens, decoder.positions_from_mask(mask), mask, frames)
  n, t = tokens.shape
  # The vision tower's rows, the embedding, then each layer's output.
  assert seen[1:] == [(n, t, cfg.d_model)] * (1 + cfg.num_layers), seen
  seen.clear()
  policy_of(cfg).rows_hidden(branch, tokens, decoder.positions_from_mask(mask), mask, frames)
  assert seen == []  # the unconstrained policy (another static argument) calls nothing


def test_equal_policies_are_one_static_argument(toy_lora):
  cfg, branch = toy_lora
  assert TextPolicy(cfg) == policy_of(cfg) and hash(TextPolicy(cfg)) == hash(policy_of(cfg))
  assert policy_of(policy_of(cfg)) == policy_of(cfg)
  traces = []

  def count(policy, params):
    traces.append(1)
    return policy.lm_head(params).sum()
  fn = jax.jit(count, static_argnums=0)
  fn(policy_of(cfg), branch)
  fn(TextPolicy(cfg), branch)  # an equal policy built again: no new trace
  assert len(traces) == 1
  with pytest.raises(ValueError, match="ModelConfig or Qwen3VLConfig"):
    policy_of({"d_model": 8})
