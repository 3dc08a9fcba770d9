"""Images and video frames -> Qwen3-VL patches (numpy, host side), as the HF processors do.

    pixel_values, image_grid_thw = preprocess_images([img_a, img_b])      # HxWx3 each
    pixel_values_videos, video_grid_thw = preprocess_video(frames)        # [F, H, W, 3]

Steps (HF Qwen2VLImageProcessor / Qwen3VLVideoProcessor):
  1. smart_resize: the nearest size whose sides are multiples of patch*merge, scaled into
     [min_pixels, max_pixels] keeping the aspect ratio (videos count t*h*w pixels);
  2. resize (bicubic; PIL here, as HF's PIL backend -- HF's torchvision backend, used when
     torchvision is installed, gives slightly different pixels; identical when no resize is
     needed);
  3. rescale by 1/255 and normalise with the processor's mean/std (Qwen3-VL: 0.5, 0.5);
  4. temporal padding: an image is repeated to temporal_patch_size frames; a video is
     padded with its last frame to a multiple of temporal_patch_size;
  5. patches in HF order: (time, block row, block col, row in block, col in block), each
     flattened as (channel, time, row, col) -> f32[t*h*w, C*Tp*P*P].

Prompt layout: an image needs `num_image_tokens(grid)` <|image_pad|> tokens; a video is
`video_placeholder_text(...)`: per temporal patch "<{t:.1f} seconds>" + <|vision_start|> +
frame-group pad tokens + <|vision_end|> (what HF's processor puts in place of one
<|video_pad|> of the chat template).

Inputs: uint8 arrays (0..255) or float arrays on the same 0..255 scale (HF rescales both
by 1/255). Frame sampling from a video file (fps) is the caller's job.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class VisionPreprocessConfig:
  """Processor settings; defaults are Qwen3-VL's image processor (preprocessor_config.json)."""
  patch_size: int = 16
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = 65536          # HF size["shortest_edge"]
  max_pixels: int = 16777216       # HF size["longest_edge"]
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
  rescale_factor: float = 1 / 255

  def __post_init__(self):
    for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"VisionPreprocessConfig.{name} must be a positive integer, got "
                         f"{value!r}")
    if self.min_pixels > self.max_pixels:
      raise ValueError(f"VisionPreprocessConfig.min_pixels={self.min_pixels} exceeds "
                       f"max_pixels={self.max_pixels}")
    try:
      object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
      object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
    except (TypeError, ValueError, OverflowError):
      raise ValueError(f"VisionPreprocessConfig.image_mean/image_std must be lists of numbers, "
                       f"got {self.image_mean!r} / {self.image_std!r}") from None
    if not all(np.isfinite(self.image_mean + self.image_std)):
      raise ValueError("VisionPreprocessConfig.image_mean/image_std must be finite")
    rescale = self.rescale_factor
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not (
        np.isfinite(rescale) and rescale > 0):
      raise ValueError(f"VisionPreprocessConfig.rescale_factor must be a positive number, got "
                       f"{rescale!r}")
    if len(self.image_mean) != len(self.image_std) or 0.0 in self.image_std:
      raise ValueError("VisionPreprocessConfig.image_mean/image_std must have one nonzero std "
                       "per channel")

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "VisionPreprocessConfig":
    """From a HF preprocessor_config.json / video_preprocessor_config.json dict."""
    fields: dict[str, Any] = {}
    size = d.get("size") or {}
    if not isinstance(size, Mapping):
      raise ValueError(f"preprocessor config 'size' must be an object, got {size!r}")
    if "shortest_edge" in size:
      fields["min_pixels"] = size["shortest_edge"]
    if "longest_edge" in size:
      fields["max_pixels"] = size["longest_edge"]
    for hf_name, name in (("min_pixels", "min_pixels"), ("max_pixels", "max_pixels"),
                          ("patch_size", "patch_size"),
                          ("temporal_patch_size", "temporal_patch_size"),
                          ("merge_size", "merge_size"), ("image_mean", "image_mean"),
                          ("image_std", "image_std"), ("rescale_factor", "rescale_factor")):
      if d.get(hf_name) is not None:
        fields[name] = d[hf_name]
    for flag in ("do_rescale", "do_normalize", "do_resize"):
      if d.get(flag) is False:
        raise ValueError(f"preprocessor config {flag}=false is not supported")
    return cls(**fields)


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
  """Image target size (HF Qwen2-VL rule): sides multiples of `factor`, h*w within
  [min_pixels, max_pixels], aspect ratio kept as closely as possible."""
  if min(height, width) <= 0:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"image aspect ratio must be at most 200, got {height}x{width}")
  h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def smart_resize_video(num_frames: int, height: int, width: int, factor: int,
                       temporal_factor: int, min_pixels: int,
                       max_pixels: int) -> tuple[int, int]:
  """Frame target size (HF Qwen3-VL video rule): like smart_resize but the pixel budget
  counts frames (t rounded to temporal_factor) and tiny frames are first scaled up."""
  if num_frames < temporal_factor:
    raise ValueError(f"a video needs at least temporal_patch_size={temporal_factor} frames, "
                     f"got {num_frames}")
  if min(height, width) <= 0:
    raise ValueError(f"frame size must be positive, got {height}x{width}")
  if height < factor or width < factor:
    scale = max(factor / height, factor / width)
    height, width = int(height * scale), int(width * scale)
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"frame aspect ratio must be at most 200, got {height}x{width}")
  h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
  t_bar = round(num_frames / temporal_factor) * temporal_factor
  if t_bar * h_bar * w_bar > max_pixels:
    beta = math.sqrt(num_frames * height * width / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif t_bar * h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (num_frames * height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _as_rgb(array, what: str) -> np.ndarray:
  x = np.asarray(array)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f"{what} must be an HxWx3 RGB array, got shape {x.shape}")
  if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f"{what} must be uint8 or float (0..255), got dtype {x.dtype}")
  if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
    raise ValueError(f"{what} has non-finite values")
  return x


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """HxWx3 -> height x width x 3 with PIL bicubic (uint8 stays uint8, as HF's PIL backend;
  floats are resized per channel in PIL mode 'F'). No-op when the size already matches."""
  if image.shape[:2] == (height, width):
    return image
  from PIL import Image
  if image.dtype == np.uint8:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
  channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32))
                         .resize((width, height), Image.BICUBIC)) for c in range(3)]
  return np.stack(channels, axis=-1)


def _normalize(frames: np.ndarray, cfg: VisionPreprocessConfig) -> np.ndarray:
  """[F, H, W, C] 0..255 -> f32 [F, C, H, W] rescaled and normalised."""
  x = frames.astype(np.float32) * np.float32(cfg.rescale_factor)
  if x.shape[-1] != len(cfg.image_mean):
    raise ValueError(f"{x.shape[-1]} channels but image_mean has {len(cfg.image_mean)}")
  x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
  return x.transpose(0, 3, 1, 2)


def patchify(frames: np.ndarray, cfg: VisionPreprocessConfig) -> tuple[np.ndarray, tuple]:
  """f32[F, C, H, W] (F a multiple of temporal_patch_size, H and W of patch*merge) ->
  (f32[t*h*w, C*Tp*P*P] in HF patch order, (t, h, w))."""
  f, c, height, width = frames.shape
  tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
  if f % tp or height % (p * m) or width % (p * m):
    raise ValueError(f"patchify: frames {frames.shape} need F % {tp} == 0 and H, W multiples "
                     f"of {p * m}")
  t, h, w = f // tp, height // p, width // p
  x = frames.reshape(t, tp, c, h // m, m, p, w // m, m, p)
  # -> time, block row, block col, row in block, col in block | channel, frame, pixel row, col
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return np.ascontiguousarray(x.reshape(t * h * w, c * tp * p * p)), (t, h, w)


def preprocess_images(images: Sequence[np.ndarray], cfg: VisionPreprocessConfig | None = None):
  """List of HxWx3 images -> (pixel_values f32[sum t*h*w, C*Tp*P*P], image_grid_thw int64[N, 3])."""
  cfg = cfg or VisionPreprocessConfig()
  if len(images) == 0:
    raise ValueError("preprocess_images needs at least one image")
  patches, grids = [], []
  for i, image in enumerate(images):
    image = _as_rgb(image, f"images[{i}]")
    height, width = smart_resize(image.shape[0], image.shape[1], cfg.factor, cfg.min_pixels,
                                 cfg.max_pixels)
    x = _normalize(resize_bicubic(image, height, width)[None], cfg)
    x = np.repeat(x, cfg.temporal_patch_size, axis=0)  # an image is a still clip
    flat, grid = patchify(x, cfg)
    patches.append(flat)
    grids.append(grid)
  return np.concatenate(patches), np.asarray(grids, np.int64)


def preprocess_video(frames, cfg: VisionPreprocessConfig | None = None):
  """Sampled frames [F, H, W, 3] -> (pixel_values_videos f32[t*h*w, C*Tp*P*P],
  video_grid_thw int64[1, 3]); F is padded with the last frame to a multiple of Tp."""
  cfg = cfg or VisionPreprocessConfig()
  frames = np.asarray(frames)
  if frames.ndim != 4:
    raise ValueError(f"frames must be [F, H, W, 3], got shape {frames.shape}")
  for i in range(frames.shape[0]):
    _as_rgb(frames[i], f"frames[{i}]")
  height, width = smart_resize_video(frames.shape[0], frames.shape[1], frames.shape[2],
                                     cfg.factor, cfg.temporal_patch_size, cfg.min_pixels,
                                     cfg.max_pixels)
  x = _normalize(np.stack([resize_bicubic(f, height, width) for f in frames]), cfg)
  pad = -x.shape[0] % cfg.temporal_patch_size
  if pad:
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
  flat, grid = patchify(x, cfg)
  return flat, np.asarray([grid], np.int64)


def num_image_tokens(grid_thw, merge_size: int = 2) -> int:
  """<|image_pad|> tokens one image needs: t*h*w / merge^2."""
  t, h, w = (int(v) for v in grid_thw)
  return t * h * w // merge_size ** 2


def frame_timestamps(frame_indices: Sequence[int], fps: float,
                     temporal_patch_size: int = 2) -> list[float]:
  """Seconds of each temporal patch: the mean time of its first and last frame (the frame
  list padded with its last index, as the video is padded with its last frame)."""
  if fps <= 0:
    raise ValueError(f"fps must be positive, got {fps}")
  idx = [int(i) for i in frame_indices]
  if not idx:
    raise ValueError("frame_indices is empty")
  idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
  return [(idx[i] + idx[i + temporal_patch_size - 1]) / fps / 2
          for i in range(0, len(idx), temporal_patch_size)]


def video_placeholder_text(grid_thw, timestamps: Sequence[float], merge_size: int = 2, *,
                           vision_start: str = "<|vision_start|>",
                           vision_end: str = "<|vision_end|>",
                           video_pad: str = "<|video_pad|>") -> str:
  """The text HF's Qwen3VLProcessor puts in place of one <|video_pad|>: per temporal patch
  "<{t:.1f} seconds>" + vision_start + h*w/merge^2 pads + vision_end."""
  t, h, w = (int(v) for v in grid_thw)
  if len(timestamps) != t:
    raise ValueError(f"{len(timestamps)} timestamps for a video of {t} temporal patches")
  per_group = h * w // merge_size ** 2
  return "".join(f"<{ts:.1f} seconds>" + vision_start + video_pad * per_group + vision_end
                 for ts in timestamps)
