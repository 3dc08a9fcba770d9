"""Qwen3-VL prompts from a checkpoint's processor files and chat template
(copd_jax/data/vl_prompts.py), on the tiny Qwen3 tokenizer fixture with a Qwen3-VL-style
template: placeholder counts per image grid, the video's per-patch timestamps, the media
that qwen3_vl_decode.prompt_media accepts, and errors naming the prompt."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import paths
from copd_jax.data import vision_preprocess as vp
from copd_jax.data import vl_prompts
from copd_jax.models import qwen3_vl_decode, qwen3_vl_import

HERE = paths.TESTS
TOKENIZER = os.path.join(HERE, "fixtures", "hf", "qwen3_tiny", "tokenizer")
VL_FIXTURE = os.path.join(HERE, "fixtures", "hf", "qwen3_vl_tiny")
RUN_FIXTURE = os.path.join(HERE, "fixtures", "hf", "qwen3_vl_run")
# The run fixture's Qwen3-VL-style template and processor settings
# (experiments/make_qwen3_vl_run_fixture.py): content items become vision placeholders.
TEMPLATE = json.load(open(os.path.join(RUN_FIXTURE, "tokenizer_config.json")))["chat_template"]
PROCESSOR = json.load(open(os.path.join(RUN_FIXTURE, "preprocessor_config.json")))


@pytest.fixture()
def checkpoint(tmp_path):
  shutil.copy(os.path.join(TOKENIZER, "tokenizer.json"), tmp_path / "tokenizer.json")
  config = json.load(open(os.path.join(TOKENIZER, "tokenizer_config.json")))
  config["chat_template"] = TEMPLATE
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
  (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(PROCESSOR))
  return str(tmp_path)


def model_config(tok):
  """The tiny Qwen3-VL config with the tokenizer's vision token ids."""
  cfg, _ = qwen3_vl_import.load_qwen3_vl(VL_FIXTURE)
  ids = {name: tok.token_id(text) for name, text in (
      ("image_token_id", vl_prompts.IMAGE_PAD), ("video_token_id", vl_prompts.VIDEO_PAD),
      ("vision_start_token_id", vl_prompts.VISION_START),
      ("vision_end_token_id", vl_prompts.VISION_END))}
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=512), **ids)


def runs(ids, token_id):
  """Lengths of the maximal runs of token_id in ids."""
  out, count = [], 0
  for i in list(ids) + [None]:
    if i == token_id:
      count += 1
    elif count:
      out, count = out + [count], 0
  return out


def test_images_of_two_sizes_get_one_pad_per_vision_token_in_order(checkpoint):
  processor = vl_prompts.VLPromptProcessor.from_checkpoint(checkpoint)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (32, 48, 3), np.uint8), rng.integers(0, 256, (16, 16, 3), np.uint8)]
  ids, media = processor.encode("how many red?", images=images)
  tok = processor.tokenizer
  # 32x48 -> grid (1, 4, 6) -> 6 tokens; 16x16 -> (1, 2, 2) -> 1 token (merge 2 x 2).
  np.testing.assert_array_equal(media["image_grid_thw"], [[1, 4, 6], [1, 2, 2]])
  assert runs(ids, tok.token_id(vl_prompts.IMAGE_PAD)) == [6, 1]
  want, _ = vp.preprocess_images(images, vp.VisionPreprocessConfig(
      patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=4096))
  np.testing.assert_array_equal(media["pixel_values"], want)
  start, end, pad = vl_prompts.VISION_START, vl_prompts.VISION_END, vl_prompts.IMAGE_PAD
  assert ids == tok.encode(f"<|im_start|>user\n{start}{pad * 6}{end}{start}{pad}{end}"
                           "how many red?<|im_end|>\n<|im_start|>assistant\n")
  cfg = model_config(tok)  # the model reads the layout back: counts and 3-D positions
  media_batch = qwen3_vl_decode.prompt_media(cfg, np.array([ids]), np.ones((1, len(ids))),
                                             [media], budget=64)
  assert int(media_batch.image_tokens[0]) == 7


def test_a_video_gets_per_patch_timestamps_and_pads(checkpoint):
  processor = vl_prompts.VLPromptProcessor.from_checkpoint(checkpoint)
  frames = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), np.uint8)
  ids, media = processor.encode("what moves?", video=frames, video_fps=2.0,
                                frame_indices=[0, 2, 4])
  tok = processor.tokenizer
  # 3 frames padded to 4 -> 2 temporal patches of (16x16 px / 8) = 4x4 patches -> 4 tokens.
  np.testing.assert_array_equal(media["video_grid_thw"], [[2, 4, 4]])
  assert runs(ids, tok.token_id(vl_prompts.VIDEO_PAD)) == [4, 4]
  # Patch times: frames (0, 2) -> 0.5 s; frames (4, 4 repeated) -> 2.0 s. The template's
  # own <|vision_start|><|video_pad|><|vision_end|> is replaced whole.
  start, end, pad = vl_prompts.VISION_START, vl_prompts.VISION_END, vl_prompts.VIDEO_PAD
  assert ids == tok.encode(f"<|im_start|>user\n<0.5 seconds>{start}{pad * 4}{end}"
                           f"<2.0 seconds>{start}{pad * 4}{end}"
                           "what moves?<|im_end|>\n<|im_start|>assistant\n")
  cfg = model_config(tok)
  qwen3_vl_decode.prompt_media(cfg, np.array([ids]), np.ones((1, len(ids))), [media], budget=64)


def test_bad_prompts_and_checkpoints_are_named(checkpoint, tmp_path_factory):
  processor = vl_prompts.VLPromptProcessor.from_checkpoint(checkpoint)
  image = np.zeros((16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match=r"rec.jsonl:3: the prompt text contains .*image_pad"):
    processor.encode("look <|image_pad|>", images=[image], where="rec.jsonl:3")
  with pytest.raises(ValueError, match="video_fps > 0"):
    processor.encode("q", video=np.zeros((2, 16, 16, 3), np.uint8))
  os.remove(os.path.join(checkpoint, "video_preprocessor_config.json"))
  without_video = vl_prompts.VLPromptProcessor.from_checkpoint(checkpoint)
  with pytest.raises(ValueError, match="no video_preprocessor_config.json"):
    without_video.encode("q", video=np.zeros((2, 16, 16, 3), np.uint8), video_fps=1.0)
  os.remove(os.path.join(checkpoint, "preprocessor_config.json"))
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json not found"):
    vl_prompts.VLPromptProcessor.from_checkpoint(checkpoint)


def test_the_run_fixture_reads_its_records_through_its_own_processor():
  """tests/fixtures/hf/qwen3_vl_run (experiments/make_qwen3_vl_run_fixture.py): its
  checkpoint, tokenizer, template and processor files agree with each other and with
  the records in tests/fixtures/data/vl -- prompts encode, their media lay out, and the
  model runs them in one batch (images of two sizes, a video) within one vision budget."""
  from PIL import Image
  run = RUN_FIXTURE
  data = os.path.join(HERE, "fixtures", "data", "vl")
  cfg, params = qwen3_vl_import.load_qwen3_vl(run)
  processor = vl_prompts.VLPromptProcessor.from_checkpoint(run)
  load = lambda name: np.asarray(Image.open(os.path.join(data, name)).convert("RGB"))  # noqa: E731
  encoded = []
  for name in ("text", "image", "video"):
    for line in open(os.path.join(data, f"{name}.jsonl")):
      record = json.loads(line)
      frames = [load(f) for f in record.get("video_frames", [])]
      encoded.append(processor.encode(
          record["prompt"], images=[load(f) for f in record.get("images", [])],
          video=np.stack(frames) if frames else None, video_fps=record.get("video_fps"),
          where=record["id"]))
  length = max(len(ids) for ids, _ in encoded)
  ids = np.array([[0] * (length - len(i)) + i for i, _ in encoded])
  mask = np.array([[0] * (length - len(i)) + [1] * len(i) for i, _ in encoded])
  media = qwen3_vl_decode.prompt_media(cfg, ids, mask, [m for _, m in encoded], budget=64)
  grids = {tuple(m["image_grid_thw"][0]) for _, m in encoded if "image_grid_thw" in m}
  assert grids == {(1, 4, 6), (1, 2, 2)}  # two image sizes
  assert any("video_grid_thw" in m for _, m in encoded)
  hidden, _ = qwen3_vl_decode.prefill(params, cfg, ids, mask, media)
  assert hidden.shape == (len(encoded), length, cfg.text.d_model)
  assert np.isfinite(np.asarray(hidden)[mask.astype(bool)]).all()
