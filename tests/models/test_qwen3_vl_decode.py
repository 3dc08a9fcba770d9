"""Sampling Qwen3-VL with the shared decoder's KV cache, on the committed tiny random
checkpoint (tests/fixtures/hf/qwen3_vl_tiny) and its reference prompt batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paths
from copd_jax import sampling
from copd_jax.models import decoder, qwen3_vl, qwen3_vl_decode, qwen3_vl_import

FIXTURE = paths.QWEN3_VL_TINY
IMAGE_PAD, VIDEO_PAD, STOP = 100, 101, 2


@pytest.fixture(scope="module")
def model():
  return qwen3_vl_import.load_qwen3_vl(FIXTURE)


@pytest.fixture(scope="module")
def ref():
  return paths.reference_outputs(FIXTURE)


def image_batch(cfg, ref):
  """Two LEFT-padded prompts: row 0 with two images (6 + 1 vision tokens), row 1 text."""
  ids, mask = ref["image_input_ids"], ref["image_attention_mask"]
  vision = qwen3_vl_decode.vision_inputs(cfg, ids, mask, ref["image_pixel_values"],
                                         ref["image_grid_thw"])
  return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool), vision


def video_batch(cfg, ref):
  ids, mask = ref["video_input_ids"], ref["video_attention_mask"]
  vision = qwen3_vl_decode.vision_inputs(cfg, ids, mask, pixel_values_videos=ref[
      "video_pixel_values"], video_grid_thw=ref["video_grid_thw"])
  return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool), vision


def sampler(max_new_tokens=6, **kw):
  return sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0,
                                 stop_token_ids=(STOP,), banned_token_ids=(IMAGE_PAD, VIDEO_PAD),
                                 **kw)


def test_rollout_rescored_by_teacher_forcing_reproduces_the_sampler(model, ref):
  cfg, params = model
  ids, mask, vision = image_batch(cfg, ref)
  g, r = 2, 6
  rollout = sampling.generate(params,
                              sampling.Sampler(cfg, sampler(r), g),
                              sampling.Prompts(ids, mask, vision), jax.random.key(0))
  tokens = np.asarray(rollout.tokens).reshape(-1, r)
  rows = np.concatenate([np.repeat(np.asarray(ids), g, axis=0), tokens], axis=1)
  row_mask = np.concatenate([np.repeat(np.asarray(mask), g, axis=0),
                             np.asarray(rollout.mask).reshape(-1, r) > 0], axis=1)
  # The oracle's positions: HF's get_rope_index over each whole row, media repeated per row.
  repeated = qwen3_vl_decode.repeat_samples(cfg, vision, ids, g)
  positions, _ = qwen3_vl.get_rope_index(cfg, rows, row_mask,
                                         np.array(repeated.image_grids))
  np.testing.assert_array_equal(
      np.where(row_mask[None], qwen3_vl_decode.sequence_positions(mask, vision, g, r), 0),
      np.where(row_mask[None], positions, 0))
  hidden = qwen3_vl.forward_hidden(params, cfg, jnp.asarray(rows),
                                   jnp.asarray(row_mask, jnp.int32),
                                   jnp.asarray(positions, jnp.int32), repeated.pixel_values,
                                   repeated.image_grids)
  logp = jax.nn.log_softmax(decoder.logits_from_hidden(hidden, qwen3_vl.lm_head(params, cfg)))
  p = ids.shape[1]
  rescored = np.take_along_axis(np.asarray(logp[:, p - 1:-1]), tokens[..., None], -1)[..., 0]
  live = np.asarray(rollout.mask).reshape(-1, r) > 0
  assert live[:, 0].all()
  sampled = np.asarray(rollout.raw_logprobs).reshape(-1, r)
  np.testing.assert_allclose(rescored[live], sampled[live], atol=2e-4)


def test_cached_sampler_draws_what_recomputing_every_row_draws(model, ref):
  cfg, params = model
  ids, mask, vision = video_batch(cfg, ref)
  args = (params, sampling.Sampler(cfg, sampler(5), 3), sampling.Prompts(ids, mask, vision),
          jax.random.key(3))
  cached, recomputed = sampling.generate(*args), sampling.generate_by_recompute(*args)
  np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
  np.testing.assert_allclose(cached.raw_logprobs, recomputed.raw_logprobs, atol=2e-4)


def tower_patch_counts(fn):
  with qwen3_vl_decode.vision_tower_calls() as seen:
    fn()
  return seen


def test_vision_tower_runs_once_per_prompt_not_per_sample(model, ref):
  cfg, params = model
  ids, mask, vision = image_batch(cfg, ref)
  patches = int(ref["image_pixel_values"].shape[0])
  g = 4  # a sample count no other test uses: generate traces anew
  args = (params, sampling.Sampler(cfg, sampler(3), g), sampling.Prompts(ids, mask, vision),
          jax.random.key(1))
  cached = tower_patch_counts(lambda: sampling.generate(*args))
  assert cached == [patches]
  recomputed = tower_patch_counts(lambda: sampling.generate_by_recompute(*args))
  assert recomputed and set(recomputed) == {g * patches}  # the baseline: every sample whole


def test_bad_prompt_batches_are_named(model, ref):
  cfg, params = model
  ids, mask, vision = image_batch(cfg, ref)
  with pytest.raises(ValueError, match="banned_token_ids must hold the image / video pad"):
    sampling.generate(params,
                      sampling.Sampler(cfg, sampling.SamplingConfig(max_new_tokens=2), 1),
                      sampling.Prompts(ids, mask, vision), jax.random.key(0))
  with pytest.raises(ValueError, match="needs vision=qwen3_vl_decode.VisionInputs"):
    sampling.generate(params,
                      sampling.Sampler(cfg, sampler(2), 1),
                      sampling.Prompts(ids, mask, None), jax.random.key(0))
  with pytest.raises(ValueError, match="image_grid_thw"):
    qwen3_vl_decode.vision_inputs(cfg, ref["image_input_ids"], ref["image_attention_mask"],
                                  ref["image_pixel_values"], ref["image_grid_thw"][:1])
