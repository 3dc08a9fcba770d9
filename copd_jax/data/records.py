"""Record datasets: prompts with reference answers from JSONL or Parquet files.

One record per JSONL line (a JSON object) or Parquet row:

  prompt       str, required   the question shown to the model
  answer       str, required   the reference answer (checked against `verifier` on load)
  capability   str             the domain: 'text' / 'image' / 'video' or a domain name such
                               as 'math' ([a-z][a-z0-9_]*). May be omitted when the source
                               is built with capability=...; must equal it otherwise.
  verifier     str, optional   'math' | 'choice' | 'exact' | 'integer' (answers_lib.VERIFIERS);
                               default: the source's default_verifier ('math')
  images       list, optional  still images: file paths (relative to the data file's
                               folder, or absolute) or the encoded bytes (PNG, JPEG, ...).
                               The toy model takes ONE; Qwen3-VL any number
  video_frames list, optional  a clip: frame paths or bytes, in order
  video_fps    number, opt.    the rate the clip's frames were sampled at (frames per
                               second); Qwen3-VL needs it for its frame timestamps
  solution     str, optional   a worked solution (SFT target), '' if absent
  id           str/int, opt.   shown in error messages with the file position

Other fields are ignored (datasets carry metadata columns). A record has at most one of
`images` / `video_frames`; that decides its modality (image / video / text).

Sources: JSONL / Parquet files, read line by line (reader='builtin', the default) or
through the Hugging Face `datasets` library (reader='datasets': load_dataset('json' |
'parquet') on the local files); and a directory written by `Dataset.save_to_disk`, read
with `datasets.load_from_disk` (name a split's directory of a saved DatasetDict). The
`datasets` library runs with HF_DATASETS_OFFLINE=1: nothing is downloaded. Image
features are read undecoded ({'bytes', 'path'}), one image column may hold a single
image. `columns` maps record fields to other column names ({'prompt': 'question'}).

Everything is validated when the source is built -- types, the verifier and the
answer's form for it, and every image is opened, verified and decoded once with Pillow
(a corrupt pixel stream fails here, not mid-run) -- and a bad record raises ValueError
naming the file and the LINE (JSONL, 1-based) or ROW (Parquet, 0-based) and the field.
The decoded pixels are dropped again and decoded anew in __getitem__, so a large image
dataset does not sit decoded in memory.

Pictures for Qwen3-VL (RecordSource(native_media=True)): Example.media holds the images
(and a video's frames, all of one size) at their own sizes as uint8 arrays; the model's
image processor (copd_jax/data/vl_prompts.py) resizes and patches them.

Frames for the toy model (float32[F, H, W, 3] in [0, 1] at the model's vision image_size): each picture is
converted to RGB and resized to image_size x image_size (bicubic, aspect ratio not kept:
our ViT takes square inputs). An image record gives F = 1 (examples.encode_prompts repeats a
still image to the model's num_frames). A video's frames are sampled to num_frames at
evenly spaced indices when it has more, and padded by repeating its last frame when it
has fewer.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from copd_jax.data import (
  answers as answers_lib,
  examples,
  math_verifier,
  toy_tasks as tasks,
  verifiers as verifiers_lib,
)

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_VERIFIER = "math"


# The fields a record may have; config.data.columns maps them to other column names.
RECORD_FIELDS = ("prompt", "answer", "capability", "verifier", "images", "video_frames",
                 "video_fps", "solution", "id")


MAX_PROMPT_CHARS = 1 << 20


@dataclasses.dataclass(frozen=True)
class Record:
  """One validated record; pictures are kept as paths / bytes until an Example is made."""
  where: str  # 'data/math.jsonl:12' or 'data/x.parquet row 3' (+ ' id=...')
  prompt: str
  answer: str
  capability: str
  verifier: str
  solution: str
  modality: str  # text | image | video
  pictures: tuple  # of absolute paths (str) or bytes; () for text
  video_fps: float | None = None  # a video's frame rate, when the record gives it


def is_saved_dataset(path: str) -> bool:
  """A directory written by `datasets` save_to_disk (a Dataset or a DatasetDict)."""
  return os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, name))
      for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def resolve_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """A path, a comma-separated string of paths, or a list; each may be a glob pattern.

  Returns the matching files (and saved `datasets` directories), globs expanded in sorted
  order. A path or pattern that matches nothing raises FileNotFoundError naming it.
  """
  if isinstance(paths, (str, os.PathLike)):
    items = [p for p in str(paths).split(",")]
  else:
    items = [str(p) for p in paths]
  items = [p.strip() for p in items]
  if not items or not all(items):
    raise ValueError(f"record file paths must be non-empty, got {paths!r}")
  files = []
  for item in items:
    matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
    matches = [m for m in matches if os.path.isfile(m) or is_saved_dataset(m)]
    if not matches:
      if os.path.isdir(item):
        raise FileNotFoundError(f"record path {item!r} is a directory but not a saved "
                                "dataset (datasets save_to_disk)")
      raise FileNotFoundError(f"record file {item!r} does not exist")
    files += matches
  return files


def _read_jsonl(path: str) -> Iterable[tuple[str, Any]]:
  """(position, parsed object) per non-blank line; bad JSON names the line."""
  with open(path, "rb") as f:  # bytes: a bad byte is reported with its line
    for number, raw in enumerate(f, start=1):
      where = f"{path}:{number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at byte offset "
                         f"{e.start} of the line)") from None
      if not line.strip():
        continue
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a valid JSON object ({e.msg} at column {e.colno})") from None
      except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to be a record") from None
      except ValueError as e:  # a number json cannot convert, e.g. a 5000-digit integer
        raise ValueError(f"{where}: unreadable JSON value ({str(e)[:200]})") from None


def _read_parquet(path: str) -> Iterable[tuple[str, Any]]:
  import pyarrow.parquet as pq
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises several types for unreadable files
    raise ValueError(f"{path}: cannot read as Parquet ({e})") from None
  for row, record in enumerate(table.to_pylist()):
    yield f"{path} row {row}", record


def import_datasets():
  """The Hugging Face `datasets` module, offline (nothing is ever downloaded)."""
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  try:
    import datasets as hf_datasets
  except ImportError:
    raise ValueError("reading a saved dataset or config.data.reader='datasets' needs the "
                     "`datasets` package (pip install datasets)") from None
  hf_datasets.config.HF_DATASETS_OFFLINE = True
  return hf_datasets


# Record fields that hold one string (parse_record) or one number: a column that mixes
# JSON types (datasets stores it as a Json feature) always holds a value these fields
# reject, as the built-in reader does.
_STRING_FIELDS = ("prompt", "answer", "capability", "verifier", "solution")
_NUMBER_FIELDS = ("video_fps",)


def _check_mixed_columns(features, path: str, columns: Mapping[str, str]) -> None:
  """A string or number record field whose column mixes JSON types across rows: datasets
  keeps it as JSON text, in which the string "7" and the number 7 look alike, so instead
  of decoding it (and accepting '7' where the built-in reader rejects 7) the file is
  rejected, naming the column, as the built-in reader rejects it."""
  json_feature = _feature_types("Json")
  for field in _STRING_FIELDS + _NUMBER_FIELDS:
    column = columns.get(field, field)
    if json_feature and isinstance(features.get(column), json_feature):
      kind = "a string" if field in _STRING_FIELDS else "a number"
      raise ValueError(f"{path}: column {column!r} (field {field!r}) mixes JSON types across "
                       f"rows (e.g. strings and numbers); every record's {field!r} must be "
                       f"{kind} (config.data.reader='builtin' names the first bad line)")


@functools.lru_cache(maxsize=None)
def _feature_types(*names: str) -> tuple:
  """The `datasets` feature classes of these names that this version has (Json, List and
  LargeList are new in datasets 4)."""
  hf_datasets = import_datasets()
  return tuple(getattr(hf_datasets, n) for n in names if hasattr(hf_datasets, n))


def _decode_json(value, feature):
  """A value read from the arrow table with its Json parts (datasets' storage of columns
  that mix types) decoded back to Python objects; other features as stored."""
  if value is None:
    return None
  json_feature = _feature_types("Json")
  if json_feature and isinstance(feature, json_feature):
    return json.loads(value)
  lists = _feature_types("List", "LargeList", "Sequence")
  if isinstance(feature, lists) and isinstance(value, list):
    return [_decode_json(v, feature.feature) for v in value]
  if isinstance(feature, dict) and isinstance(value, dict):
    return {k: _decode_json(v, feature.get(k)) for k, v in value.items()}
  return value


def _rows_of(dataset, path: str, columns: Mapping[str, str] | None = None
             ) -> Iterable[tuple[str, Any]]:
  """(position, row dict) of a `datasets.Dataset`, read from its arrow table: image
  features stay undecoded ({'bytes', 'path'}), which _picture_list reads; columns that
  mix JSON types are decoded, or rejected for string and number fields."""
  if getattr(dataset, "_indices", None) is not None:
    dataset = dataset.flatten_indices()
  features = dataset.features
  _check_mixed_columns(features, path, columns or {})
  mixed = [k for k, f in features.items() if "Json(" in repr(f)]  # Json anywhere inside
  row = 0
  for batch in dataset.data.to_batches():
    for record in batch.to_pylist():
      for column in mixed:
        record[column] = _decode_json(record.get(column), features[column])
      yield f"{path} row {row}", record
      row += 1


def _read_saved_dataset(path: str, columns: Mapping[str, str] | None = None
                        ) -> Iterable[tuple[str, Any]]:
  hf_datasets = import_datasets()
  dict_file = os.path.join(path, "dataset_dict.json")
  if os.path.isfile(dict_file):
    with open(dict_file, encoding="utf-8") as f:
      splits = json.load(f).get("splits", [])
    raise ValueError(f"{path}: a saved DatasetDict with splits {splits}; name one split's "
                     f"directory, e.g. {os.path.join(path, splits[0] if splits else 'train')}")
  try:
    dataset = hf_datasets.load_from_disk(path)
  except Exception as e:  # datasets raises several types for unreadable directories
    raise ValueError(f"{path}: cannot load with datasets.load_from_disk ({type(e).__name__}: "
                     f"{e})") from None
  return _rows_of(dataset, path, columns)


def _read_with_datasets(path: str, suffix: str, columns: Mapping[str, str] | None = None
                        ) -> Iterable[tuple[str, Any]]:
  hf_datasets = import_datasets()
  builder = "json" if suffix in JSONL_SUFFIXES else "parquet"
  try:
    dataset = hf_datasets.load_dataset(builder, data_files=[os.path.abspath(path)],
                                       split="train")
  except Exception as e:  # arrow / datasets errors on malformed or mixed-type files
    raise ValueError(f"{path}: cannot read with datasets.load_dataset({builder!r}) "
                     f"({type(e).__name__}: {e})") from None
  return _rows_of(dataset, path, columns)


def _read_file(path: str, reader: str = "builtin", columns: Mapping[str, str] | None = None
               ) -> Iterable[tuple[str, Any]]:
  """(position, raw record) of a file; columns (record field -> column name) tell the
  `datasets` readers which columns hold which field."""
  if is_saved_dataset(path):
    return _read_saved_dataset(path, columns)
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
    raise ValueError(f"{path}: unknown record file type {suffix!r}; use "
                     f"{JSONL_SUFFIXES + PARQUET_SUFFIXES} or a saved dataset directory")
  if reader == "datasets":
    return _read_with_datasets(path, suffix, columns)
  if reader != "builtin":
    raise ValueError(f"unknown record reader {reader!r}; use 'builtin' or 'datasets'")
  return _read_jsonl(path) if suffix in JSONL_SUFFIXES else _read_parquet(path)


def apply_columns(raw, columns: Mapping[str, str], where: str):
  """The raw record with config.data.columns applied: field <- raw[column]. A mapped
  column that is missing is an error naming the column and the field."""
  if not columns or not isinstance(raw, dict):
    return raw
  mapped = dict(raw)
  for field, column in columns.items():
    mapped.pop(field, None)
    if column in raw:
      mapped[field] = raw[column]
    elif field in ("prompt", "answer"):
      raise ValueError(f"{where}: column {column!r} (config.data.columns.{field}) is missing")
  return mapped


def _string_field(raw: dict, field: str, where: str, *, required: bool) -> str:
  value = raw.get(field)
  if value is None:
    if required:
      raise ValueError(f"{where}: field {field!r} is missing")
    return ""
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {field!r} must be a string, got "
                     f"{type(value).__name__} {str(value)[:40]!r}")
  try:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer encodes
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{where}: field {field!r} holds an invalid character "
                     f"{value[e.start]!r} at position {e.start} (a lone UTF-16 surrogate)") from None
  return value


def _picture_list(raw: dict, field: str, where: str, folder: str) -> tuple:
  value = raw.get(field)
  if value is None:
    return ()
  if isinstance(value, dict) and "bytes" in value:  # one HF datasets Image value
    value = [value]
  if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
    raise ValueError(f"{where}: field {field!r} must be a list of file paths or bytes, got "
                     f"{type(value).__name__}")
  pictures = []
  for i, item in enumerate(value):
    if isinstance(item, dict) and "bytes" in item:  # HF datasets' Image feature in Parquet
      item = item["bytes"] if item["bytes"] is not None else item.get("path")
    if isinstance(item, str) and item:
      item = item if os.path.isabs(item) else os.path.join(folder, item)
      if os.path.exists(item) and not os.path.isfile(item):  # a FIFO would block forever
        raise ValueError(f"{where}: {field}[{i}] must name a regular file, got {item!r}")
    elif not isinstance(item, (bytes, bytearray)) or not item:
      raise ValueError(f"{where}: {field}[{i}] must be a file path or bytes, got "
                       f"{type(item).__name__}")
    _verify_picture(item, f"{where}: {field}[{i}]")
    pictures.append(bytes(item) if isinstance(item, bytearray) else item)
  return tuple(pictures)


def _open_picture(item):
  from PIL import Image
  return Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)


def _verify_picture(item, what: str) -> None:
  """Opens, verifies (chunk checksums) and fully decodes an image file or bytes with
  Pillow; ValueError naming `what`. Decoding is what catches a corrupt pixel stream
  under valid checksums, which would otherwise fail mid-run."""
  try:
    with _open_picture(item) as picture:
      picture.verify()
    with _open_picture(item) as picture:  # verify() leaves the image unusable: reopen
      picture.load()
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError ... on bad data
    name = item if isinstance(item, str) else f"{len(item)} bytes"
    raise ValueError(f"{what} is not a readable image ({name}: {type(e).__name__}: {e})") from None


def parse_record(raw, where: str, folder: str, *, capability: str | None,
                 default_verifier: str) -> Record:
  """Validates one raw record (a dict); ValueError naming `where` and the field."""
  if not isinstance(raw, dict):
    raise ValueError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
  if raw.get("id") is not None:
    where = f"{where} (id {str(raw['id'])[:40]})"
  prompt = _string_field(raw, "prompt", where, required=True)
  if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
    raise ValueError(f"{where}: field 'prompt' must be non-empty and at most "
                     f"{MAX_PROMPT_CHARS} characters, got {len(prompt)}")
  answer = _string_field(raw, "answer", where, required=True)
  record_capability = _string_field(raw, "capability", where, required=capability is None)
  if capability is not None and record_capability not in ("", capability):
    raise ValueError(f"{where}: field 'capability' is {record_capability!r}, but this "
                     f"source holds {capability!r} records")
  record_capability = record_capability or capability
  if record_capability not in tasks.CAPABILITIES and not examples.is_domain_name(record_capability):
    raise ValueError(f"{where}: field 'capability' must be one of {tasks.CAPABILITIES} or a "
                     f"domain name ([a-z][a-z0-9_]*), got {record_capability!r}")
  verifier = _string_field(raw, "verifier", where, required=False) or default_verifier
  try:
    verifiers_lib.check_reference(verifier, answer)
  except ValueError as e:
    raise ValueError(f"{where}: field 'answer'/'verifier': {e}") from None
  images = _picture_list(raw, "images", where, folder)
  video = _picture_list(raw, "video_frames", where, folder)
  if images and video:
    raise ValueError(f"{where}: a record has 'images' or 'video_frames', not both")
  video_fps = _video_fps(raw, where, has_video=bool(video))
  modality = "image" if images else "video" if video else "text"
  if record_capability in tasks.CAPABILITIES and record_capability != modality:
    raise ValueError(f"{where}: a {record_capability!r} record needs "
                     f"{ {'text': 'no pictures', 'image': 'one image in images', 'video': 'video_frames'}[record_capability]}"
                     f", this one has {modality} input")
  return Record(where=where, prompt=prompt, answer=answer, capability=record_capability,
                verifier=verifier, solution=_string_field(raw, "solution", where, required=False),
                modality=modality, pictures=images or video, video_fps=video_fps)


def _video_fps(raw: dict, where: str, *, has_video: bool) -> float | None:
  value = raw.get("video_fps")
  if value is None:
    return None
  if not has_video:
    raise ValueError(f"{where}: field 'video_fps' is given without 'video_frames'")
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      np.isfinite(value) and value > 0):
    raise ValueError(f"{where}: field 'video_fps' must be a positive number of frames per "
                     f"second, got {value!r}")
  return float(value)


@functools.lru_cache(maxsize=16)
def _load_records(files: tuple[str, ...], stamps: tuple, capability: str | None,
                  default_verifier: str, reader: str, columns: tuple,
                  reward_config: math_verifier.RewardConfig | None) -> tuple[Record, ...]:
  # Cached on (files, modification times, ...): a run's setup checks and its data streams
  # read the same files once.
  del stamps
  records = []
  for path in files:
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    records += [parse_record(apply_columns(raw, dict(columns), where), where, folder,
                             capability=capability, default_verifier=default_verifier)
                for where, raw in _read_file(path, reader, dict(columns))]
  _check_math_references_parse(records, reward_config)
  return tuple(records)


def _stamp(path: str) -> tuple:
  """Modification time and size of a file, or of every file in a saved dataset directory."""
  if os.path.isdir(path):
    return tuple(_stamp(os.path.join(path, n)) for n in sorted(os.listdir(path))
                 if os.path.isfile(os.path.join(path, n)))
  return (os.path.getmtime(path), os.path.getsize(path))


def _check_math_references_parse(records: Sequence[Record],
                                 reward_config: math_verifier.RewardConfig | None) -> None:
  """Every 'math' reference must parse with math-verify (in the verifier workers), and
  be checkable within the reward limits: against one that is not, every response would
  score 0 (math_verifier.uncheckable_math_references; reward_config: the run's limits,
  None = RewardConfig's defaults)."""
  math_records = [r for r in records if r.verifier == "math"]
  if not math_records:
    return
  bad = math_verifier.uncheckable_math_references([r.answer for r in math_records],
                                                  reward_config)
  if bad:
    index, why = bad[0]
    first = math_records[index]
    raise ValueError(f"{first.where}: field 'answer' {first.answer!r} {why}, so every "
                     f"response to it would score 0; {len(bad)} of {len(math_records)} "
                     "math references fail this check")


def load_records(paths, *, capability: str | None = None,
                 default_verifier: str = DEFAULT_VERIFIER, reader: str = "builtin",
                 columns: Mapping[str, str] | None = None,
                 reward_config: math_verifier.RewardConfig | None = None) -> tuple[Record, ...]:
  """All records of the files (see resolve_paths), validated; ValueError names file+line
  (or row). reader: 'builtin' | 'datasets'; columns: record field -> column name;
  reward_config: the reward limits 'math' references are checked within (None: defaults)."""
  if default_verifier not in answers_lib.VERIFIERS:
    raise ValueError(f"default_verifier must be one of {answers_lib.VERIFIERS}, got "
                     f"{default_verifier!r}")
  files = tuple(resolve_paths(paths))
  stamps = tuple(_stamp(f) for f in files)
  records = _load_records(files, stamps, capability, default_verifier, reader,
                          tuple(sorted(dict(columns or {}).items())), reward_config)
  if not records:
    raise ValueError(f"record files {list(files)} hold no records")
  return records


def picture_array(item, image_size: int) -> np.ndarray:
  """An image file path or bytes -> float32[image_size, image_size, 3] in [0, 1]."""
  from PIL import Image
  with _open_picture(item) as picture:
    rgb = picture.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, np.float32) / 255.0


def frame_indices(num_available: int, num_frames: int) -> np.ndarray:
  """int[num_frames]: evenly spaced frames of a longer clip; a shorter one is padded by
  repeating its last frame. E.g. (8, 4) -> [0, 2, 5, 7]; (2, 4) -> [0, 1, 1, 1]."""
  if num_available >= num_frames:
    return np.round(np.linspace(0, num_available - 1, num_frames)).astype(int)
  return np.minimum(np.arange(num_frames), num_available - 1)


def picture_uint8(item) -> np.ndarray:
  """An image file path or bytes -> uint8[H, W, 3] at its own size."""
  with _open_picture(item) as picture:
    return np.asarray(picture.convert("RGB"), np.uint8)


def picture_size(item) -> tuple[int, int]:
  """(height, width) of an image file or bytes, read from its header (no decoding)."""
  with _open_picture(item) as picture:
    return picture.height, picture.width


def record_media(record: Record) -> examples.NativeMedia | None:
  """A picture record's images (or video frames) at their own sizes; None for text.
  Errors name the record: video frames of different sizes."""
  if record.modality == "text":
    return None
  arrays = tuple(picture_uint8(p) for p in record.pictures)
  if record.modality == "image":
    return examples.NativeMedia(images=arrays)
  sizes = sorted({a.shape for a in arrays})
  if len(sizes) > 1:
    raise ValueError(f"{record.where}: the video's frames have different sizes {sizes}")
  return examples.NativeMedia(video=np.stack(arrays), video_fps=record.video_fps)


def record_frames(record: Record, image_size: int, num_frames: int) -> np.ndarray | None:
  """float32[F, H, W, 3] for a picture record (F = 1 for an image), None for text."""
  if record.modality == "text":
    return None
  pictures = record.pictures
  if record.modality == "video":
    pictures = [pictures[i] for i in frame_indices(len(pictures), num_frames)]
  return np.stack([picture_array(p, image_size) for p in pictures])


class RecordSource:
  """Random-access records as examples.Example (a grain data source: __len__, __getitem__).

  paths: a path, a comma-separated string or a list of paths (globs allowed), JSONL or
    Parquet, or saved `datasets` directories. capability: if given, every record must be
    of it (records may then omit the field). reader / columns: see load_records. image_size / num_frames: the model's vision input (setup.example_kwargs);
    needed when a record has pictures; 0 / 0 means a text-only model, which rejects
    picture records. default_verifier: for records without a `verifier` field.
    native_media: examples carry their pictures at their own sizes (Example.media, for
    Qwen3-VL) instead of frames; image_size / num_frames are then unused.
  """

  def __init__(self, paths, *, capability: str | None = None, image_size: int | None = None,
               num_frames: int | None = None, default_verifier: str = DEFAULT_VERIFIER,
               reader: str = "builtin", columns: Mapping[str, str] | None = None,
               native_media: bool = False,
               reward_config: math_verifier.RewardConfig | None = None):
    self.records = load_records(paths, capability=capability, default_verifier=default_verifier,
                                reader=reader, columns=columns, reward_config=reward_config)
    self.capability = capability
    self.image_size = image_size
    self.num_frames = num_frames
    self.native_media = native_media
    if native_media:
      return
    several = next((r for r in self.records if r.modality == "image" and len(r.pictures) > 1),
                   None)
    if several is not None:
      raise ValueError(f"{several.where}: field 'images' has {len(several.pictures)} images; "
                       f"this model takes one picture per prompt (use 'video_frames' for a "
                       f"sequence; Qwen3-VL takes several)")
    first_picture = next((r for r in self.records if r.modality != "text"), None)
    if first_picture is not None:
      if not image_size or not num_frames:
        detail = ("the model has no vision tower" if image_size == 0 or num_frames == 0
                  else "RecordSource needs image_size and num_frames (the model's vision "
                       "config, setup.example_kwargs)")
        raise ValueError(f"{first_picture.where}: a {first_picture.modality} record, but "
                         f"{detail}")

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> examples.Example:
    record = self.records[index]
    try:
      if self.native_media:
        frames, media = None, record_media(record)
      else:
        frames, media = record_frames(record, self.image_size, self.num_frames), None
    except (OSError, SyntaxError) as e:  # Pillow's errors: the file changed since loading
      raise ValueError(f"{record.where}: cannot decode its pictures ({type(e).__name__}: "
                       f"{e})") from None
    return examples.Example(record.capability, record.prompt, record.answer, record.solution,
                         frames, verifier=record.verifier, modality=record.modality,
                         record=record.where, media=media)

  def __repr__(self) -> str:
    return f"RecordSource({len(self)} records, capability={self.capability!r})"
