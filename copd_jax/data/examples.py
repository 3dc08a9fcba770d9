"""Examples, prompt batches and their encoding into token rows (and decoding back to text)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import numbers
from typing import Sequence

import numpy as np

from copd_jax.data import verifiers as verifiers_lib
from copd_jax.data.tokenizer import Tokenizer

CAPABILITIES = ("text", "image", "video")
SPLITS = ("train", "eval", "validation")
NUM_HASH_BUCKETS = 8  # eval and validation get 1/8 of the example space each, train 6/8
EVAL_BUCKET = 0
VALIDATION_BUCKET = 1  # for choosing hyper-parameters: never trained on, never reported
SPLIT_BUCKETS = {"eval": frozenset({EVAL_BUCKET}), "validation": frozenset({VALIDATION_BUCKET}),
                 "train": frozenset(range(NUM_HASH_BUCKETS)) - {EVAL_BUCKET, VALIDATION_BUCKET}}


@dataclasses.dataclass(frozen=True, eq=False)
class NativeMedia:
  """A record's pictures at their own sizes, for a policy with its own image processor
  (Qwen3-VL, copd_jax/data/vl_prompts.py) instead of the toy's fixed-size frames.

  images: uint8[H, W, 3] arrays, any number and sizes (an image record);
  video: uint8[F, H, W, 3] frames sampled at video_fps frames per second, or None;
  frame_indices: the frames' indices in the source video (for timestamps), or None for
    0..F-1.
  """
  images: tuple = ()
  video: np.ndarray | None = None
  video_fps: float | None = None
  frame_indices: tuple | None = None

  def hash_parts(self) -> list[bytes]:
    parts = []
    for array in self.images + (() if self.video is None else (self.video,)):
      parts += [repr(array.shape).encode("ascii"), np.ascontiguousarray(array).tobytes()]
    parts.append(f"{self.video_fps}\x00{self.frame_indices}".encode("ascii"))
    return parts


def _check_int(field: str, value, minimum: int, maximum: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{field} must be an integer, got {value!r}")
  if value < minimum or (maximum is not None and value > maximum):
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ValueError(f"{field} must be {bound}, got {value}")
  return int(value)


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """One task instance: a procedural toy example or a record from a dataset file.

  capability: one of CAPABILITIES, or -- for records (copd_jax/data/records.py) -- a domain
    name such as 'math' or 'science' ([a-z][a-z0-9_]*), which then needs `modality`.
  question: the prompt text.
  answer: the reference answer, valid for `verifier` (the toy suite: a canonical
    non-negative integer string < 100).
  solution: the SFT target response (the toy suite: a worked trace ending in
    ANSWER_MARKER + answer); records may leave it empty.
  frames: float32[F, H, W, 3] in [0, 1], read-only; F=1 for an image, F=num_frames for
    a video, None for text and for examples that carry `media` instead.
  verifier: how a response is scored (verifiers.VERIFIERS); the toy suite's 'integer'.
  modality: 'text', 'image' or 'video' -- which input the prompt carries. Defaults to
    `capability` for the built-in capabilities (and must equal it).
  record: where a record came from ('file.jsonl:12', 'file.parquet row 3'); '' for the
    toy suite. Error messages name it.
  media: NativeMedia -- an image / video record's pictures at their own sizes (a
    Qwen3-VL policy's input; then frames is None), or None.
  """
  capability: str
  question: str
  answer: str
  solution: str = ""
  frames: np.ndarray | None = None
  verifier: str = "integer"
  modality: str | None = None
  record: str = ""
  media: NativeMedia | None = None

  def __post_init__(self):
    object.__setattr__(self, "modality", _check_modality(self.capability, self.modality))
    if self.media is not None:
      self._check_media()
    elif (self.frames is None) != (self.modality == "text"):
      raise ValueError(f"Example.frames must be None exactly for text examples; got "
                       f"{'None' if self.frames is None else 'an array'} for a "
                       f"{self.modality} example{self._where()}")
    if self.frames is not None:
      frames = np.array(self.frames, dtype=np.float32)  # a private copy, then frozen
      if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"Example.frames must be float32[F, H, W, 3], got shape "
                         f"{frames.shape}{self._where()}")
      frames.setflags(write=False)
      object.__setattr__(self, "frames", frames)
    try:
      verifiers_lib.check_reference(self.verifier, self.answer)
    except ValueError as e:
      raise ValueError(f"Example.answer/verifier{self._where()}: {e}") from None

  def _check_media(self) -> None:
    media = self.media
    if not isinstance(media, NativeMedia) or self.frames is not None:
      raise ValueError(f"Example.media must be a NativeMedia, given instead of frames"
                       f"{self._where()}")
    wanted = {"image": bool(media.images) and media.video is None,
              "video": media.video is not None and not media.images}.get(self.modality, False)
    if not wanted:
      raise ValueError(f"Example.media of a {self.modality} example must hold "
                       f"{'images only' if self.modality == 'image' else 'a video only'}"
                       f"{self._where()}")

  def _where(self) -> str:
    return f" (record {self.record})" if self.record else ""

  @functools.cached_property
  def _content_hash(self) -> str:
    digest = hashlib.sha256()
    for part in (self.capability, self.question, self.answer, self.solution):
      digest.update(part.encode("utf-8") + b"\x00")
    if self.frames is not None:
      digest.update(repr(self.frames.shape).encode("ascii"))
      digest.update(np.ascontiguousarray(self.frames, dtype="<f4").tobytes())
    # Fields added for records enter the hash only when set, so every toy example keeps
    # its hash (and hence its train/eval split).
    if self.verifier != "integer" or self.modality != self.capability:
      digest.update(f"{self.verifier}\x00{self.modality}\x00".encode("utf-8"))
    if self.media is not None:
      for part in self.media.hash_parts():
        digest.update(part)
    return digest.hexdigest()[:32]

  def key(self) -> str:
    """Content hash (32 hex chars) of capability, text fields and frames."""
    return self._content_hash

  def describe(self) -> str:
    where = f" from {self.record}" if self.record else ""
    return f"{self.capability} example{where} {self.question[:80]!r}"


def is_domain_name(name) -> bool:
  """A record domain name: lower-case letters, digits and '_', starting with a letter."""
  return (isinstance(name, str) and 0 < len(name) <= 64 and name[0].isascii()
          and name[0].isalpha() and name[0].islower()
          and all(ch.isascii() and (ch.isdigit() or ch == "_" or (ch.isalpha() and ch.islower()))
                  for ch in name))


def _check_modality(capability, modality) -> str:
  """The modality of an example (see Example); ValueError naming the field if invalid."""
  if capability in CAPABILITIES:
    if modality not in (None, capability):
      raise ValueError(f"Example.modality of a {capability!r} example must be "
                       f"{capability!r}, got {modality!r}")
    return capability
  if not is_domain_name(capability) or modality is None:
    raise ValueError(f"Example.capability must be one of {CAPABILITIES}, or a record "
                     f"domain name ([a-z][a-z0-9_]*) given with a modality, got "
                     f"{capability!r} (modality {modality!r})")
  if modality not in CAPABILITIES:
    raise ValueError(f"Example.modality must be one of {CAPABILITIES}, got {modality!r}")
  return modality


def hash_bucket(example: Example) -> int:
  """Which of NUM_HASH_BUCKETS the example's content falls in (EVAL_BUCKET = held out)."""
  return int(example.key()[:8], 16) % NUM_HASH_BUCKETS


def prompt_token_ids(example: Example, tokenizer: Tokenizer, num_vision_tokens: int) -> list[int]:
  """The prompt of an example as token ids.

  A tokenizer with a chat template (one that has `prompt_token_ids(question,
  num_vision_tokens)`, e.g. hf_tokenizer.HFTokenizer) renders the question as a user
  turn plus the generation prompt, with its vision placeholders. Otherwise (ToyTokenizer):
  [bos] + [image_id] * num_vision_tokens (image/video only) + encode(question).
  """
  vision_tokens = num_vision_tokens if example.frames is not None else 0
  chat_prompt = getattr(tokenizer, "prompt_token_ids", None)
  if callable(chat_prompt):
    return list(chat_prompt(example.question, num_vision_tokens=vision_tokens))
  return [tokenizer.bos_id] + [tokenizer.image_id] * vision_tokens + tokenizer.encode(example.question)


def prompt_length(example: Example, tokenizer: Tokenizer, num_vision_tokens: int) -> int:
  return len(prompt_token_ids(example, tokenizer, num_vision_tokens))


def response_token_ids(example: Example, tokenizer: Tokenizer) -> list[int]:
  """encode(solution) + [eos]: the SFT target."""
  return tokenizer.encode(example.solution) + [tokenizer.eos_id]


@dataclasses.dataclass
class PromptBatch:
  """Prompts as arrays for the sampler.

  tokens: int32[B, P], LEFT-padded with pad_id (every prompt ends at column P-1).
  mask: bool[B, P], True on real tokens.
  frames: float32[B, F, H, W, 3]; zeros for text rows, an image repeated F times.
    None for a model without a vision tower (encoded with num_frames=0).
  capability_ids: int32[B], index into CAPABILITIES of each row's modality (for the toy
    suite that is its capability).
  answers: B reference answers for the verifier.
  """
  tokens: np.ndarray
  mask: np.ndarray
  frames: np.ndarray | None
  capability_ids: np.ndarray
  answers: list[str]


def _check_batch_args(examples, max_prompt_len, num_vision_tokens, num_frames,
                      image_size) -> None:
  if len(examples) == 0:
    raise ValueError("examples must be non-empty")
  _check_int("max_prompt_len", max_prompt_len, 1)
  _check_int("num_vision_tokens", num_vision_tokens, 0)
  # num_frames = image_size = 0: a text-only model (no vision tower, frames None).
  no_vision = num_frames == 0 and image_size == 0
  _check_int("num_frames", num_frames, 0 if no_vision else 1)
  _check_int("image_size", image_size, 0 if no_vision else 1)


def _clip(example: Example, row: int, num_frames: int, image_size: int) -> np.ndarray:
  """An example's frames as float32[num_frames, image_size, image_size, 3]."""
  frames = example.frames
  expected_count = 1 if example.modality == "image" else num_frames
  if frames.shape != (expected_count, image_size, image_size, 3):
    raise ValueError(f"examples[{row}] ({example.describe()}) has frames of shape "
                     f"{frames.shape}; expected {(expected_count, image_size, image_size, 3)}")
  # One vision path for all rows: an image becomes a still clip of num_frames frames.
  return np.broadcast_to(frames, (num_frames, image_size, image_size, 3))


def _prompt_rows(examples, tokenizer, max_prompt_len, num_vision_tokens, num_frames,
                 image_size) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """-> left-padded tokens int32[B, P], mask bool[B, P], frames, capability_ids."""
  batch = len(examples)
  tokens = np.full((batch, max_prompt_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((batch, max_prompt_len), bool)
  has_vision = num_frames > 0
  frames = (np.zeros((batch, num_frames, image_size, image_size, 3), np.float32)
            if has_vision else None)
  for row, example in enumerate(examples):
    if not isinstance(example, Example):
      raise ValueError(f"examples[{row}] must be a tasks.Example, got {type(example).__name__}")
    if example.frames is not None:
      if not has_vision:
        raise ValueError(f"examples[{row}] ({example.describe()}) has {example.modality} "
                         "input, but the model has no vision tower")
      if num_vision_tokens < 1:
        raise ValueError(f"num_vision_tokens must be >= 1 to encode examples[{row}] "
                         f"({example.describe()})")
      frames[row] = _clip(example, row, num_frames, image_size)
    ids = prompt_token_ids(example, tokenizer, num_vision_tokens)
    if len(ids) > max_prompt_len:
      raise ValueError(f"examples[{row}] ({example.describe()}) needs {len(ids)} prompt "
                       f"tokens, more than max_prompt_len={max_prompt_len}")
    tokens[row, max_prompt_len - len(ids):] = ids
    mask[row, max_prompt_len - len(ids):] = True
  capability_ids = np.array([CAPABILITIES.index(ex.modality) for ex in examples], np.int32)
  return tokens, mask, frames, capability_ids


def encode_prompts(examples: Sequence[Example], tokenizer: Tokenizer, *, max_prompt_len: int,
                   num_vision_tokens: int, num_frames: int, image_size: int) -> PromptBatch:
  """B examples -> PromptBatch with P = max_prompt_len (see PromptBatch for layout)."""
  _check_batch_args(examples, max_prompt_len, num_vision_tokens, num_frames, image_size)
  tokens, mask, frames, capability_ids = _prompt_rows(
      examples, tokenizer, max_prompt_len, num_vision_tokens, num_frames, image_size)
  return PromptBatch(tokens, mask, frames, capability_ids, [ex.answer for ex in examples])


def encode_sft_batch(examples: Sequence[Example], tokenizer: Tokenizer, *, max_prompt_len: int,
                     max_response_len: int, num_vision_tokens: int, num_frames: int,
                     image_size: int) -> dict[str, np.ndarray]:
  """B examples -> SFT arrays with T = P + R (P = max_prompt_len, R = max_response_len).

  tokens: int32[B, T]: columns [0, P) the left-padded prompt, then solution + eos,
    right-padded with pad_id.
  mask: bool[B, T], True on real tokens.
  loss_mask: float32[B, T], 1 at position t iff tokens[t+1] is a response token
    (solution or eos): hidden[t] predicts tokens[t+1], so the loss is
    sum_t loss_mask[t] * -log p(tokens[t+1] | tokens[<=t]). The last column is always 0.
  frames: float32[B, F, H, W, 3]; capability_ids: int32[B].
  """
  _check_batch_args(examples, max_prompt_len, num_vision_tokens, num_frames, image_size)
  _check_int("max_response_len", max_response_len, 1)
  prompt_tokens, prompt_mask, frames, capability_ids = _prompt_rows(
      examples, tokenizer, max_prompt_len, num_vision_tokens, num_frames, image_size)
  batch = len(examples)
  response = np.full((batch, max_response_len), tokenizer.pad_id, np.int32)
  response_mask = np.zeros((batch, max_response_len), bool)
  loss_mask = np.zeros((batch, max_prompt_len + max_response_len), np.float32)
  for row, example in enumerate(examples):
    ids = response_token_ids(example, tokenizer)
    if len(ids) > max_response_len:
      raise ValueError(f"examples[{row}] ({example.describe()}) needs {len(ids)} response "
                       f"tokens (solution {example.solution!r} + eos), more than "
                       f"max_response_len={max_response_len}")
    response[row, :len(ids)] = ids
    response_mask[row, :len(ids)] = True
    # Position P-1 (last prompt token) predicts the first response token.
    loss_mask[row, max_prompt_len - 1:max_prompt_len - 1 + len(ids)] = 1.0
  return {
      "tokens": np.concatenate([prompt_tokens, response], axis=1),
      "mask": np.concatenate([prompt_mask, response_mask], axis=1),
      "loss_mask": loss_mask,
      "frames": frames,
      "capability_ids": capability_ids,
  }


def decode_responses(rollout_tokens: np.ndarray, rollout_mask: np.ndarray, tokenizer) -> list[str]:
  """tokens, mask: [N, R] -> N response strings (tokens outside the mask dropped)."""
  return [tokenizer.decode([int(t) for t, m in zip(row, mask_row) if m])
          for row, mask_row in zip(rollout_tokens, rollout_mask)]

