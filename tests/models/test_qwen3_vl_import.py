"""Qwen3-VL import: parity with transformers on the committed tiny fixture (no torch here).

The fixture (tests/fixtures/hf/qwen3_vl_tiny) is written by
experiments/make_qwen3_vl_fixture.py with transformers' Qwen3VLForConditionalGeneration.
"""
import json
import os
import shutil

import numpy as np
import pytest

import paths
from copd_jax.data import vision_preprocess as vp
from copd_jax.models import qwen3_vl, qwen3_vl_config, qwen3_vl_import

FIXTURE = paths.QWEN3_VL_TINY
# The fixture's processor settings: patch 8, merge 2, temporal 2, mean = std = 0.5.
PRE = vp.VisionPreprocessConfig(patch_size=8, merge_size=2, temporal_patch_size=2,
                                min_pixels=64, max_pixels=1 << 20)


@pytest.fixture(scope="module")
def ref():
  return paths.reference_outputs(FIXTURE)


@pytest.fixture(scope="module")
def loaded():
  return qwen3_vl_import.load_qwen3_vl(FIXTURE)


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_images_matches_fixture_patches(ref):
  pixel_values, grid = vp.preprocess_images([ref["images_0"], ref["images_1"]], PRE)
  np.testing.assert_array_equal(grid, ref["image_grid_thw"])
  np.testing.assert_allclose(pixel_values, ref["image_pixel_values"], atol=1e-6)
  assert [vp.num_image_tokens(g, 2) for g in grid] == [6, 1]


def test_preprocess_video_pads_last_frame_and_matches_fixture(ref):
  pixel_values, grid = vp.preprocess_video(ref["frames"], PRE)  # 3 frames -> 2 temporal patches
  np.testing.assert_array_equal(grid, ref["video_grid_thw"])
  np.testing.assert_allclose(pixel_values, ref["video_pixel_values"], atol=1e-6)


def test_patch_order_against_explicit_loops():
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
  cfg = vp.VisionPreprocessConfig(patch_size=8, merge_size=2, temporal_patch_size=2,
                                  min_pixels=1, max_pixels=1 << 20, image_mean=(0.1, 0.2, 0.3),
                                  image_std=(0.5, 0.6, 0.7))
  flat, grid = vp.preprocess_video(frames, cfg)
  t, h, w = grid[0]
  p, m, tp = 8, 2, 2
  normed = ((frames / 255.0 - np.array(cfg.image_mean)) / np.array(cfg.image_std))
  n = 0
  for ti in range(t):
    for br in range(h // m):
      for bc in range(w // m):
        for ir in range(m):
          for ic in range(m):
            row, col = br * m + ir, bc * m + ic
            want = [normed[ti * tp + f, row * p + y, col * p + x, c]
                    for c in range(3) for f in range(tp) for y in range(p) for x in range(p)]
            np.testing.assert_allclose(flat[n], want, atol=1e-5)
            n += 1
  assert n == flat.shape[0]


def test_smart_resize_rules():
  assert vp.smart_resize(100, 200, 32, 1024, 1 << 20) == (96, 192)   # nearest multiples
  assert vp.smart_resize(1000, 1000, 32, 1024, 65536) == (256, 256)  # shrunk into max_pixels
  assert vp.smart_resize(10, 20, 32, 65536, 1 << 24) == (192, 384)   # grown to min_pixels
  with pytest.raises(ValueError, match="aspect ratio"):
    vp.smart_resize(1, 500, 32, 1024, 1 << 20)
  with pytest.raises(ValueError, match="at least temporal_patch_size"):
    vp.smart_resize_video(1, 64, 64, 32, 2, 1024, 1 << 20)


def test_resize_and_prompt_helpers():
  img = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  cfg = vp.VisionPreprocessConfig(patch_size=8, merge_size=2, min_pixels=64,
                                  max_pixels=1 << 20)
  pixel_values, grid = vp.preprocess_images([img], cfg)
  # 40x60 -> 32x64: Python's round() (as HF) rounds 40/16 = 2.5 to even.
  assert grid.tolist() == [[1, 4, 8]]
  assert pixel_values.shape == (32, 3 * 2 * 8 * 8)
  assert np.abs(pixel_values).max() <= 1.0 + 1e-6  # normalised from 0..255 with 0.5/0.5
  assert vp.frame_timestamps([0, 12, 24], fps=24) == [0.25, 1.0]
  text = vp.video_placeholder_text([2, 4, 4], [0.25, 1.0])
  assert text.startswith("<0.2 seconds><|vision_start|>") or text.startswith(
      "<0.3 seconds><|vision_start|>")
  assert text.count("<|video_pad|>") == 8 and text.count("<|vision_start|>") == 2
  with pytest.raises(ValueError, match="images\\[0\\] must be an HxWx3"):
    vp.preprocess_images([np.zeros((4, 4))])


# --------------------------------------------------------------------------- config + positions


def test_config_from_hf(loaded):
  cfg, _ = loaded
  assert cfg.mrope_section == (4, 2, 2)
  assert cfg.vision.deepstack_visual_indexes == (0, 1)
  assert cfg.text.tie_embeddings and cfg.text.num_kv_heads == 2
  with open(os.path.join(FIXTURE, "config.json")) as f:
    raw = json.load(f)
  # transformers 4.x wrote rope_theta + rope_scaling instead of rope_parameters.
  legacy = json.loads(json.dumps(raw))
  rope = legacy["text_config"].pop("rope_parameters")
  legacy["text_config"]["rope_theta"] = rope.pop("rope_theta")
  legacy["text_config"]["rope_scaling"] = rope
  del legacy["vision_config"]["rope_parameters"]
  assert qwen3_vl_config.Qwen3VLConfig.from_hf(legacy) == cfg
  bad = json.loads(json.dumps(raw))
  bad["vision_config"]["hidden_act"] = "relu"
  with pytest.raises(ValueError, match="vision_config.hidden_act"):
    qwen3_vl_config.Qwen3VLConfig.from_hf(bad)
  bad = json.loads(json.dumps(raw))
  bad["text_config"]["rope_parameters"]["mrope_section"] = [4, 2, 1]
  with pytest.raises(ValueError, match="mrope_section"):
    qwen3_vl_config.Qwen3VLConfig.from_hf(bad)
  bad = json.loads(json.dumps(raw))
  bad["text_config"]["rope_parameters"]["rope_type"] = "yarn"
  with pytest.raises(ValueError, match="rope_type"):
    qwen3_vl_config.Qwen3VLConfig.from_hf(bad)
  bad = json.loads(json.dumps(raw))
  del bad["video_token_id"]
  with pytest.raises(ValueError, match="video_token_id"):
    qwen3_vl_config.Qwen3VLConfig.from_hf(bad)


@pytest.mark.parametrize("kind", ["image", "video", "mixed"])
def test_rope_index_matches_hf(loaded, ref, kind):
  cfg, _ = loaded
  grids = {k: v for k, v in _vision_inputs(ref, kind).items() if k.endswith("grid_thw")}
  positions, _ = qwen3_vl.get_rope_index(cfg, ref[f"{kind}_input_ids"],
                                         ref[f"{kind}_attention_mask"], **grids)
  mask = ref[f"{kind}_attention_mask"].astype(bool)
  np.testing.assert_array_equal(positions[:, mask], ref[f"{kind}_position_ids"][:, mask])


def test_rope_index_rejects_wrong_pad_count(loaded, ref):
  cfg, _ = loaded
  ids = ref["image_input_ids"][:1].copy()
  ids[0, np.argmax(ids[0] == cfg.image_token_id)] = 5  # one image pad token fewer
  with pytest.raises(ValueError, match="image pad tokens"):
    qwen3_vl.get_rope_index(cfg, ids, None, ref["image_grid_thw"])


# --------------------------------------------------------------------------- logits parity


def _vision_inputs(ref, kind):
  if kind == "image":
    return dict(pixel_values=ref["image_pixel_values"], image_grid_thw=ref["image_grid_thw"])
  video = dict(pixel_values_videos=ref["video_pixel_values"],
               video_grid_thw=ref["video_grid_thw"])
  if kind == "video":
    return video
  first = int(np.prod(ref["image_grid_thw"][0]))  # mixed: the video, then image 1 only
  return dict(video, pixel_values=ref["image_pixel_values"][first:],
              image_grid_thw=ref["image_grid_thw"][1:])


def _logits(params, cfg, ref, kind):
  vision = _vision_inputs(ref, kind)
  return np.asarray(qwen3_vl.forward(params, cfg, ref[f"{kind}_input_ids"],
                                     ref[f"{kind}_attention_mask"], **vision))


@pytest.mark.parametrize("kind", ["image", "video", "mixed"])
def test_logits_match_transformers(loaded, ref, kind):
  cfg, params = loaded
  logits = _logits(params, cfg, ref, kind)
  mask = ref[f"{kind}_attention_mask"].astype(bool)  # padded positions are meaningless
  np.testing.assert_allclose(logits[mask], ref[f"{kind}_logits"][mask], atol=1e-4, rtol=1e-4)


def test_fixture_exercises_deepstack(loaded, ref):
  """Without the DeepStack features the logits move far beyond the parity tolerance."""
  cfg, params = loaded
  visual = dict(params["visual"])
  for k in range(len(cfg.vision.deepstack_visual_indexes)):
    name = f"deepstack_merger_list_{k}"
    visual[name] = dict(visual[name], linear_fc2={
        key: np.zeros_like(v) for key, v in visual[name]["linear_fc2"].items()})
  logits = _logits(dict(params, visual=visual), cfg, ref, "image")
  assert np.abs(logits[0] - ref["image_logits"][0]).max() > 1e-2


def test_forward_rejects_mismatched_inputs(loaded, ref):
  cfg, params = loaded
  with pytest.raises(ValueError, match="pixel_values must be"):
    qwen3_vl.forward(params, cfg, ref["image_input_ids"], ref["image_attention_mask"],
                     pixel_values=ref["image_pixel_values"][:-4],
                     image_grid_thw=ref["image_grid_thw"])
  with pytest.raises(ValueError, match="pixel_values is None"):
    qwen3_vl.forward(params, cfg, ref["image_input_ids"], ref["image_attention_mask"])


# --------------------------------------------------------------------------- checkpoint errors


def _rewrite_checkpoint(tmp_path, edit):
  from safetensors.numpy import load_file, save_file
  shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path / "config.json")
  tensors = load_file(os.path.join(FIXTURE, "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  return str(tmp_path)


def test_loader_names_missing_tensor(tmp_path):
  path = _rewrite_checkpoint(tmp_path, lambda t: t.pop("model.visual.merger.norm.bias"))
  with pytest.raises(ValueError, match="missing tensors.*visual/merger/norm/bias"):
    qwen3_vl_import.load_qwen3_vl(path)


def test_loader_names_unexpected_tensor(tmp_path):
  path = _rewrite_checkpoint(tmp_path, lambda t: t.update(
      {"model.visual.blocks.7.norm1.weight": np.ones(32, np.float32)}))
  with pytest.raises(ValueError, match="model.safetensors: unexpected tensor "
                                       "'model.visual.blocks.7.norm1.weight'"):
    qwen3_vl_import.load_qwen3_vl(path)


def test_loader_names_misshaped_tensor(tmp_path):
  name = "model.language_model.layers.1.self_attn.k_proj.weight"
  path = _rewrite_checkpoint(tmp_path, lambda t: t.update({name: np.ones((16, 64), np.float32)}))
  with pytest.raises(ValueError, match=f"tensor '{name}' has shape \\(16, 64\\), expected "
                                       "\\(32, 64\\)"):
    qwen3_vl_import.load_qwen3_vl(path)


def test_loader_reads_bf16_checkpoint(tmp_path, loaded):
  import ml_dtypes
  path = _rewrite_checkpoint(tmp_path, lambda t: t.update(
      {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
  cfg, params = qwen3_vl_import.load_qwen3_vl(path, dtype="bfloat16")
  assert cfg.text.dtype == "bfloat16"
  emb = params["embed_tokens"]["embedding"]
  assert emb.dtype == np.float32
  np.testing.assert_allclose(emb, loaded[1]["embed_tokens"]["embedding"], rtol=1e-2, atol=1e-2)
