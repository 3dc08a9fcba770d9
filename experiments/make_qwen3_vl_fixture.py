"""Regenerates tests/fixtures/hf/qwen3_vl_tiny/ with the `transformers` Qwen3-VL implementation.

Run with an environment that has torch + transformers (not needed by the tests):
    /work/hfref-venv/bin/python experiments/make_qwen3_vl_fixture.py [--out DIR]

Writes:
  config.json, model.safetensors   a tiny random Qwen3VLForConditionalGeneration (f32), saved
                                   with save_pretrained(safe_serialization=True)
  reference.npz                    inputs and HF outputs:
    images_{k} uint8[H, W, 3], frames uint8[F, H, W, 3]    raw inputs for preprocessing
    image_pixel_values, image_grid_thw, video_pixel_values, video_grid_thw
    {image,video,mixed}_input_ids, _attention_mask, _position_ids (get_rope_index), _logits
    (mixed: the video, then the second image -- pixel_values rows of image 1 only)
  reference.json                   what was generated, with versions

Preprocessing: the HF image/video processor classes need PIL or torchvision, which the
reference environment lacks, so they are NOT run here. Instead the raw images/frames are
chosen with sides that are already multiples of patch*merge (no resize), and the patches
are made here with torch view/permute in HF's documented layout (rescale 1/255, normalise
with mean = std = 0.5, repeat an image to temporal_patch_size frames, pad a video with its
last frame). copd_jax.data.vision_preprocess must reproduce them; smart_resize and resizing are
checked separately in tests/models/test_qwen3_vl_import.py.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import transformers
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

IMAGE, VIDEO, VSTART, VEND = 100, 101, 102, 103
PATCH, TEMPORAL, MERGE = 8, 2, 2
MEAN = STD = 0.5


def tiny_config() -> Qwen3VLConfig:
  text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
              max_position_embeddings=512, rms_norm_eps=1e-6, attention_bias=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [4, 2, 2], "mrope_interleaved": True})
  vision = dict(depth=3, hidden_size=32, hidden_act="gelu_pytorch_tanh", intermediate_size=64,
                num_heads=2, in_channels=3, patch_size=PATCH, spatial_merge_size=MERGE,
                temporal_patch_size=TEMPORAL, out_hidden_size=64, num_position_embeddings=16,
                deepstack_visual_indexes=[0, 1])
  return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                       video_token_id=VIDEO, vision_start_token_id=VSTART,
                       vision_end_token_id=VEND, tie_word_embeddings=True)


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Replaces HF's tiny init (std 0.02) by O(1)-scale values so parity is meaningful."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif p.ndim >= 2 and "embed" not in name:
        p.copy_(noise / np.sqrt(p[0].numel()))
      else:
        p.copy_(0.5 * noise)


def patchify(clip: np.ndarray) -> tuple[np.ndarray, list[int]]:
  """uint8[F, H, W, 3] (F a multiple of TEMPORAL, H and W of PATCH*MERGE) -> HF patches."""
  x = torch.from_numpy(clip).float().permute(0, 3, 1, 2) / 255.0  # [F, C, H, W]
  x = (x - MEAN) / STD
  f, c, h, w = x.shape
  gt, gh, gw = f // TEMPORAL, h // PATCH, w // PATCH
  x = x.view(gt, TEMPORAL, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
  x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, block row, block col, in-row, in-col, C, T, P, P
  return x.reshape(gt * gh * gw, c * TEMPORAL * PATCH * PATCH).numpy(), [gt, gh, gw]


def text(rng, n):
  return list(rng.integers(0, 100, n))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                    "fixtures", "hf", "qwen3_vl_tiny"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  cfg = tiny_config()
  model = Qwen3VLForConditionalGeneration(cfg)
  model.config._attn_implementation = "eager"
  for sub in (model.model.visual, model.model.language_model):
    sub.config._attn_implementation = "eager"
  randomize(model, seed=1)
  model.eval()
  model.save_pretrained(args.out, safe_serialization=True)

  ref: dict[str, np.ndarray] = {}
  # (a) two images of different grids in one prompt row + a left-padded text-only row.
  images = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
            rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)]
  pixel_values, grids = [], []
  for k, img in enumerate(images):
    ref[f"images_{k}"] = img
    patches, grid = patchify(np.repeat(img[None], TEMPORAL, axis=0))
    pixel_values.append(patches)
    grids.append(grid)
  image_pixel_values = np.concatenate(pixel_values)
  image_grid_thw = np.array(grids, np.int64)
  row = text(rng, 3)
  for (_, gh, gw) in grids:
    row += [VSTART] + [IMAGE] * (gh * gw // MERGE ** 2) + [VEND] + text(rng, 2)
  row += text(rng, 2)
  short = text(rng, 5)
  pad = len(row) - len(short)
  ids = np.array([row, [0] * pad + short], np.int64)
  mask = np.array([[1] * len(row), [0] * pad + [1] * len(short)], np.int64)
  ref.update(image_input_ids=ids, image_attention_mask=mask,
             image_pixel_values=image_pixel_values, image_grid_thw=image_grid_thw)

  # (b) a video of 3 frames (padded to 4 = 2 temporal patches), timestamps as text tokens.
  frames = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  ref["frames"] = frames
  padded = np.concatenate([frames, frames[-1:]], axis=0)
  video_pixel_values, vgrid = patchify(padded)
  per_group = vgrid[1] * vgrid[2] // MERGE ** 2
  vrow = text(rng, 2)
  for _ in range(vgrid[0]):
    vrow += text(rng, 3) + [VSTART] + [VIDEO] * per_group + [VEND]  # "<t seconds>" + frame group
  vrow += text(rng, 3)
  vids = np.array([vrow], np.int64)
  ref.update(video_input_ids=vids, video_attention_mask=np.ones_like(vids),
             video_pixel_values=video_pixel_values, video_grid_thw=np.array([vgrid], np.int64))

  # (c) one row with the video first, then the second image (joint DeepStack injection).
  mrow = text(rng, 2)
  for _ in range(vgrid[0]):
    mrow += text(rng, 2) + [VSTART] + [VIDEO] * per_group + [VEND]
  mrow += text(rng, 2) + [VSTART] + [IMAGE] * (grids[1][1] * grids[1][2] // MERGE ** 2) + [VEND]
  mids = np.array([mrow], np.int64)
  ref.update(mixed_input_ids=mids, mixed_attention_mask=np.ones_like(mids))

  with torch.no_grad():
    for kind in ("image", "video", "mixed"):
      ids_t = torch.from_numpy(ref[f"{kind}_input_ids"])
      mask_t = torch.from_numpy(ref[f"{kind}_attention_mask"])
      mm_types = (ids_t == IMAGE).int() + 2 * (ids_t == VIDEO).int()
      vision_kw = {}
      if kind in ("image", "mixed"):
        sl = slice(None) if kind == "image" else slice(1, 2)  # mixed: only the second image
        n_before = 0 if kind == "image" else int(np.prod(grids[0]))
        vision_kw.update(
            pixel_values=torch.from_numpy(ref["image_pixel_values"][n_before:]),
            image_grid_thw=torch.from_numpy(ref["image_grid_thw"][sl]))
      if kind in ("video", "mixed"):
        vision_kw.update(pixel_values_videos=torch.from_numpy(ref["video_pixel_values"]),
                         video_grid_thw=torch.from_numpy(ref["video_grid_thw"]))
      grid_kw = {k: v for k, v in vision_kw.items() if k.endswith("grid_thw")}
      position_ids, _ = model.model.get_rope_index(ids_t, mm_token_type_ids=mm_types,
                                                   attention_mask=mask_t, **grid_kw)
      out = model(input_ids=ids_t, attention_mask=mask_t, mm_token_type_ids=mm_types,
                  **vision_kw)
      ref[f"{kind}_position_ids"] = position_ids.numpy()
      ref[f"{kind}_logits"] = out.logits.float().numpy()
  np.savez_compressed(os.path.join(args.out, "reference.npz"), **ref)
  with open(os.path.join(args.out, "reference.json"), "w") as f:
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
               "attn_implementation": "eager", "dtype": "float32",
               "arrays": {k: list(v.shape) for k, v in ref.items()}}, f, indent=1)
  print("wrote", args.out, {k: v.shape for k, v in ref.items()})


if __name__ == "__main__":
  main()
