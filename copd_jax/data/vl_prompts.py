"""Qwen3-VL prompts from a checkpoint's own processor settings and chat template.

    processor = VLPromptProcessor.from_checkpoint("/models/Qwen3-VL-4B-Instruct")
    ids, media = processor.encode("How many red squares?", images=[img_a, img_b])
    ids, media = processor.encode("What happens?", video=frames, video_fps=2.0)

What HF's Qwen3VLProcessor does, restated:
  1. the user turn is a list of content items -- one {"type": "image"} per image, a
     {"type": "video"}, then the text -- rendered by the checkpoint's chat template, which
     writes <|vision_start|><|image_pad|><|vision_end|> for an image and
     <|vision_start|><|video_pad|><|vision_end|> for a video;
  2. images become patches with the settings of preprocessor_config.json, and the k-th
     <|image_pad|> is repeated once per vision token of the k-th image (t*h*w / merge^2);
  3. a video becomes patches with video_preprocessor_config.json, and its whole
     <|vision_start|><|video_pad|><|vision_end|> is replaced, per temporal patch, by
     "<{t:.1f} seconds>" + <|vision_start|> + h*w/merge^2 x <|video_pad|> + <|vision_end|>,
     t the mean time of the patch's first and last frame (frames sampled at video_fps);
  4. the text is tokenized (special-token text becomes the special token).
No processor setting has a default here: they come from the checkpoint's files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from copd_jax.data import vision_preprocess as vp
from copd_jax.data.hf_tokenizer import HFTokenizer

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
IMAGE_CONFIG, VIDEO_CONFIG = "preprocessor_config.json", "video_preprocessor_config.json"


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as err:
    raise ValueError(f"{path}: cannot read the processor settings ({err})") from err
  if not isinstance(data, dict):
    raise ValueError(f"{path}: must hold a JSON object")
  return data


@dataclasses.dataclass(frozen=True)
class VLPromptProcessor:
  """A checkpoint's tokenizer and image / video processor settings (video: None when the
  checkpoint has no video_preprocessor_config.json; a video then is an error)."""
  tokenizer: HFTokenizer
  image: vp.VisionPreprocessConfig
  video: vp.VisionPreprocessConfig | None

  @classmethod
  def from_checkpoint(cls, directory: str, tokenizer_dir: str | None = None,
                      **tokenizer_kwargs: Any) -> "VLPromptProcessor":
    image_path = os.path.join(directory, IMAGE_CONFIG)
    if not os.path.isfile(image_path):
      raise FileNotFoundError(f"{image_path} not found: a Qwen3-VL checkpoint's image "
                              "processor settings are required (no defaults are assumed)")
    try:
      image = vp.VisionPreprocessConfig.from_hf(_read_json(image_path))
    except ValueError as err:
      raise ValueError(f"{image_path}: {err}") from err
    video = None
    video_path = os.path.join(directory, VIDEO_CONFIG)
    if os.path.isfile(video_path):
      try:
        video = vp.VisionPreprocessConfig.from_hf(_read_json(video_path))
      except ValueError as err:
        raise ValueError(f"{video_path}: {err}") from err
    return cls(HFTokenizer(tokenizer_dir or directory, **tokenizer_kwargs), image, video)

  def render(self, prompt: str, num_images: int, has_video: bool) -> str:
    """The chat-rendered user turn with one placeholder per image / video (step 1)."""
    content: list[dict] = [{"type": "image"} for _ in range(num_images)]
    if has_video:
      content.append({"type": "video"})
    content.append({"type": "text", "text": prompt})
    return self.tokenizer.render_chat([{"role": "user", "content": content}],
                                      add_generation_prompt=True)

  def encode(self, prompt: str, images: Sequence[np.ndarray] = (), video: np.ndarray | None = None,
             video_fps: float | None = None, frame_indices: Sequence[int] | None = None,
             where: str = "prompt") -> tuple[list[int], dict]:
    """(token ids, media) of one prompt. images: H x W x 3 arrays (0..255); video:
    [F, H, W, 3] frames sampled at video_fps frames per second (frame_indices: their
    indices in the source video, default 0..F-1). media holds pixel_values /
    image_grid_thw and pixel_values_videos / video_grid_thw as vision_preprocess makes
    them (what qwen3_vl_decode.prompt_media takes). Errors name `where`."""
    for token in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD):
      if token in prompt:  # the text would smuggle in a placeholder with no media
        raise ValueError(f"{where}: the prompt text contains the special token {token}")
    text = self.render(prompt, len(images), video is not None)
    media: dict = {}
    if images:
      pixel_values, grids = vp.preprocess_images(list(images), self.image)
      text = _expand_image_pads(text, grids, self.image.merge_size, where)
      media.update(pixel_values=pixel_values, image_grid_thw=grids)
    if video is not None:
      if self.video is None:
        raise ValueError(f"{where}: has a video, but the checkpoint has no {VIDEO_CONFIG}")
      if video_fps is None or not video_fps > 0:
        raise ValueError(f"{where}: a video needs its sampling rate video_fps > 0, got "
                         f"{video_fps!r}")
      frames = np.asarray(video)
      indices = list(range(len(frames))) if frame_indices is None else list(frame_indices)
      if len(indices) != len(frames):
        raise ValueError(f"{where}: {len(indices)} frame indices for {len(frames)} frames")
      pixel_values, grids = vp.preprocess_video(frames, self.video)
      stamps = vp.frame_timestamps(indices, video_fps, self.video.temporal_patch_size)
      text = _expand_video(text, grids[0], stamps, self.video.merge_size, where)
      media.update(pixel_values_videos=pixel_values, video_grid_thw=grids)
    return self.tokenizer.encode(text), media


def _expand_image_pads(text: str, grids, merge_size: int, where: str) -> str:
  """The k-th <|image_pad|> -> one per vision token of image k."""
  pieces = text.split(IMAGE_PAD)
  if len(pieces) - 1 != len(grids):
    raise ValueError(f"{where}: the chat template wrote {len(pieces) - 1} {IMAGE_PAD} for "
                     f"{len(grids)} images")
  out = [pieces[0]]
  for grid, piece in zip(grids, pieces[1:]):
    out += [IMAGE_PAD * vp.num_image_tokens(grid, merge_size), piece]
  return "".join(out)


def _expand_video(text: str, grid, timestamps, merge_size: int, where: str) -> str:
  """The video's <|vision_start|><|video_pad|><|vision_end|> (or a bare <|video_pad|>) ->
  per temporal patch: "<t seconds>" + <|vision_start|> + pads + <|vision_end|>."""
  if text.count(VIDEO_PAD) != 1:
    raise ValueError(f"{where}: the chat template wrote {text.count(VIDEO_PAD)} {VIDEO_PAD} "
                     "for one video")
  placeholder = vp.video_placeholder_text(grid, timestamps, merge_size,
                                          vision_start=VISION_START, vision_end=VISION_END,
                                          video_pad=VIDEO_PAD)
  wrapped = VISION_START + VIDEO_PAD + VISION_END
  if wrapped in text:
    return text.replace(wrapped, placeholder, 1)
  return text.replace(VIDEO_PAD, placeholder, 1)
