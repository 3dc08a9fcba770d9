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
from copd_jax.data.examples import CAPABILITIES, Example, PromptBatch
from copd_jax.data.hf_tokenizer import HFTokenizer
from copd_jax.models import qwen3_vl_decode
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
IMAGE_CONFIG, VIDEO_CONFIG = "preprocessor_config.json", "video_preprocessor_config.json"


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except RecursionError:
    raise ValueError(f"{path}: cannot read the processor settings (JSON nested too "
                     "deeply)") from None
  except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError, huge integers
    raise ValueError(f"{path}: cannot read the processor settings ({type(err).__name__}: "
                     f"{str(err)[:200]})") from None
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
    return self.tokenizer.render_chat(self.tokenizer.chat_messages(content),
                                      add_generation_prompt=True)

  def encode(self, prompt: str, images: Sequence[np.ndarray] = (), video: np.ndarray | None = None,
             video_fps: float | None = None, frame_indices: Sequence[int] | None = None,
             where: str = "prompt") -> tuple[list[int], dict]:
    """(token ids, media) of one prompt. images: H x W x 3 arrays (0..255); video:
    [F, H, W, 3] frames sampled at video_fps frames per second (frame_indices: their
    indices in the source video, default 0..F-1). media holds pixel_values /
    image_grid_thw and pixel_values_videos / video_grid_thw as vision_preprocess makes
    them (what qwen3_vl_decode.prompt_media takes). Errors name `where`."""
    media: dict = {}
    image_grids, video_grid, stamps = (), None, ()
    if images:
      pixel_values, grids = vp.preprocess_images(list(images), self.image)
      media.update(pixel_values=pixel_values, image_grid_thw=grids)
      image_grids = [tuple(int(v) for v in g) for g in grids]
    if video is not None:
      frames = np.asarray(video)
      stamps = self._video_timestamps(len(frames), video_fps, frame_indices, where)
      pixel_values, grids = vp.preprocess_video(frames, self.video)
      media.update(pixel_values_videos=pixel_values, video_grid_thw=grids)
      video_grid = tuple(int(v) for v in grids[0])
    text = self.prompt_text(prompt, image_grids, video_grid, stamps, where)
    return self.tokenizer.encode(text), media

  def _video_timestamps(self, num_frames: int, video_fps, frame_indices, where: str) -> list:
    if self.video is None:
      raise ValueError(f"{where}: has a video, but the checkpoint has no {VIDEO_CONFIG}")
    if video_fps is None or not video_fps > 0:
      raise ValueError(f"{where}: a video needs its sampling rate video_fps > 0, got "
                       f"{video_fps!r}")
    indices = list(range(num_frames)) if frame_indices is None else list(frame_indices)
    if len(indices) != num_frames:
      raise ValueError(f"{where}: {len(indices)} frame indices for {num_frames} frames")
    return vp.frame_timestamps(indices, video_fps, self.video.temporal_patch_size)

  def prompt_text(self, prompt: str, image_grids: Sequence[tuple], video_grid: tuple | None,
                  timestamps: Sequence[float], where: str = "prompt") -> str:
    """The chat-rendered prompt with its placeholders expanded for media of these grids
    (steps 1-3 without pixels)."""
    for token in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD):
      if token in prompt:  # the text would smuggle in a placeholder with no media
        raise ValueError(f"{where}: the prompt text contains the special token {token}")
    text = self.render(prompt, len(image_grids), video_grid is not None)
    if image_grids:
      text = _expand_image_pads(text, image_grids, self.image.merge_size, where)
    if video_grid is not None:
      text = _expand_video(text, video_grid, timestamps, self.video.merge_size, where)
    return text

  def image_grid(self, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of an image of this size (no pixels needed)."""
    h, w = vp.smart_resize(height, width, self.image.factor, self.image.min_pixels,
                           self.image.max_pixels)
    return (1, h // self.image.patch_size, w // self.image.patch_size)

  def video_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of a clip of num_frames frames of this size."""
    cfg = self.video
    h, w = vp.smart_resize_video(num_frames, height, width, cfg.factor,
                                 cfg.temporal_patch_size, cfg.min_pixels, cfg.max_pixels)
    return (-(-num_frames // cfg.temporal_patch_size), h // cfg.patch_size, w // cfg.patch_size)

  def measure(self, prompt: str, image_sizes: Sequence[tuple[int, int]] = (),
              video_shape: tuple[int, int, int] | None = None, video_fps: float | None = None,
              where: str = "prompt") -> tuple[int, int]:
    """(prompt tokens, vision patches) of a prompt whose images have image_sizes
    [(H, W)] and whose video has video_shape (F, H, W): what encode would make, from the
    sizes alone (decoding no pixels). Errors name `where`."""
    image_grids = [self.image_grid(h, w) for h, w in image_sizes]
    video_grid, stamps = None, ()
    if video_shape is not None:
      stamps = self._video_timestamps(video_shape[0], video_fps, None, where)
      video_grid = self.video_grid(*video_shape)
    text = self.prompt_text(prompt, image_grids, video_grid, stamps, where)
    patches = sum(t * h * w for t, h, w in image_grids + ([video_grid] if video_grid else []))
    return len(self.tokenizer.encode(text)), patches

  def encode_example(self, example: Example) -> tuple[list[int], dict]:
    """encode() of an Example whose pictures are in Example.media (records read with
    RecordSource(native_media=True)); a text example has no media."""
    where = example.record or example.describe()
    media = example.media
    if example.modality != "text" and media is None:
      raise ValueError(f"{where}: a {example.modality} example without Example.media (read "
                       "its records with native_media=True)")
    if media is None:
      return self.encode(example.question, where=where)
    return self.encode(example.question, images=media.images, video=media.video,
                       video_fps=media.video_fps, frame_indices=media.frame_indices,
                       where=where)


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


def encode_prompt_batch(examples: Sequence[Example], processor: VLPromptProcessor,
                        model_cfg: Qwen3VLConfig, *, max_prompt_len: int,
                        vision_budget: int) -> PromptBatch:
  """B examples -> PromptBatch for a Qwen3-VL policy: tokens int32[B, P] LEFT-padded to
  P = max_prompt_len, mask bool[B, P], and frames = the prompts' media as
  qwen3_vl_decode.PromptMedia with vision_budget patches each (one compiled program for
  every mix of images, videos and text). Errors name the record."""
  if not examples:
    raise ValueError("examples must be non-empty")
  pad = processor.tokenizer.pad_id
  tokens = np.full((len(examples), max_prompt_len), pad, np.int32)
  mask = np.zeros((len(examples), max_prompt_len), bool)
  media = []
  for row, example in enumerate(examples):
    ids, item = processor.encode_example(example)
    if len(ids) > max_prompt_len:
      raise ValueError(f"{example.record or example.describe()}: the prompt needs {len(ids)} "
                       f"tokens (chat template and vision placeholders included), more than "
                       f"max_prompt_len={max_prompt_len}")
    tokens[row, max_prompt_len - len(ids):] = ids
    mask[row, max_prompt_len - len(ids):] = True
    media.append(item)
  frames = qwen3_vl_decode.prompt_media(
      model_cfg, tokens, mask, media, vision_budget,
      names=[ex.record or ex.describe() for ex in examples])
  capability_ids = np.array([CAPABILITIES.index(ex.modality) for ex in examples], np.int32)
  return PromptBatch(tokens, mask, frames, capability_ids, [ex.answer for ex in examples])

