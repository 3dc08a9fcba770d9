"""Fault injection for the tokenizer directory and for record files: each case is an input
that raised a raw UnicodeDecodeError / RecursionError / ValueError / TypeError / OSError
(or passed loading and failed mid-run), and checks the named error that replaced it:
the file (and the line, for records) and what is wrong."""
import io
import json
import os
import re
import shutil
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

import paths
from copd_jax.data import records, vl_prompts
from copd_jax.data.hf_tokenizer import HFTokenizer

REPO = paths.REPO
TOKENIZER_DIR = os.path.join(paths.FIXTURES, "hf", "qwen3_tiny", "tokenizer")
VL_CHECKPOINT = os.path.join(paths.FIXTURES, "hf", "qwen3_vl_run")
VL_DATA = os.path.join(paths.FIXTURES, "data", "vl")
import fixture_configs  # noqa: E402


def _tokenizer_dir(tmp_path):
  directory = tmp_path / "tok"
  shutil.copytree(TOKENIZER_DIR, directory)
  return directory


# ----------------------------------------------------------- tokenizer directory

@pytest.mark.parametrize("content, message", [
    (b'{"eos_token": "<|im_end|>\xff"}', r"tokenizer_config\.json: not UTF-8 \(byte 0xff"),
    (b"[" * 100_000 + b"]" * 100_000, r"tokenizer_config\.json: JSON nested too deeply"),
    (b'{"model_max_length": ' + b"9" * 5000 + b"}",
     r"tokenizer_config\.json: unreadable JSON value \(Exceeds the limit"),
    (b'["a list"]', r"tokenizer_config\.json: must hold a JSON object, got list"),
    (b'{"eos_token": 7}', r"tokenizer_config\.json: special token entry 7 is neither"),
])
def test_malformed_tokenizer_config_is_a_named_error(tmp_path, content, message):
  directory = _tokenizer_dir(tmp_path)
  (directory / "tokenizer_config.json").write_bytes(content)
  with pytest.raises(ValueError, match=message):
    HFTokenizer(str(directory))


def test_non_utf8_chat_template_file_is_a_named_error(tmp_path):
  directory = _tokenizer_dir(tmp_path)
  (directory / "chat_template.jinja").write_bytes(b"{{ messages }}\xfe")
  with pytest.raises(ValueError, match=r"chat_template\.jinja: not UTF-8 \(byte 0xfe at offset 14\)"):
    HFTokenizer(str(directory))


@pytest.mark.parametrize("call", ["prompt_token_ids", "encode"])
def test_lone_surrogate_text_is_a_named_error(call):
  tok = HFTokenizer(TOKENIZER_DIR)
  with pytest.raises(ValueError, match=r"invalid character '\\ud800' at position 2 \(a lone "
                                       r"UTF-16 surrogate\)"):
    getattr(tok, call)("ab\ud800")


@pytest.mark.parametrize("name, content, message", [
    ("preprocessor_config.json", b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    ("preprocessor_config.json", b'{"size": [1, 2]}', "'size' must be an object"),
    ("video_preprocessor_config.json", b'{"rescale_factor": "x"}', "rescale_factor must be"),
])
def test_malformed_processor_settings_are_a_named_error(tmp_path, name, content, message):
  checkpoint = tmp_path / "vl"
  shutil.copytree(VL_CHECKPOINT, checkpoint)
  (checkpoint / name).write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(name) + ".*" + re.escape(message)):
    vl_prompts.VLPromptProcessor.from_checkpoint(str(checkpoint))


# ------------------------------------------------------------------------- records

def _png_bytes(seed=0, size=32):
  buffer = io.BytesIO()
  pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(buffer, "PNG")
  return buffer.getvalue()


def _corrupt_pixels_keep_checksums(png: bytes) -> bytes:
  """The PNG with 8 bytes of its compressed pixel data (IDAT) inverted and every chunk's
  CRC recomputed: Pillow's verify() passes, decoding fails."""
  out, pos = [png[:8]], 8
  while pos < len(png):
    (length,) = struct.unpack(">I", png[pos:pos + 4])
    kind, body = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
    if kind == b"IDAT":
      body = bytearray(body)
      for i in range(len(body) // 2, len(body) // 2 + 8):
        body[i] ^= 0xFF
      body = bytes(body)
    out.append(struct.pack(">I", length) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    pos += 12 + length
  return b"".join(out)


def test_the_corrupt_png_passes_verify_but_not_decoding():
  """The fixture itself: checksums valid, pixels not (what the tests below rely on)."""
  bad = _corrupt_pixels_keep_checksums(_png_bytes())
  with Image.open(io.BytesIO(bad)) as picture:
    picture.verify()
  with pytest.raises(OSError), Image.open(io.BytesIO(bad)) as picture:
    picture.load()


@pytest.mark.parametrize("field", ["images", "video_frames"])
def test_corrupt_pixel_data_is_caught_at_load_naming_the_record(tmp_path, field):
  (tmp_path / "good.png").write_bytes(_png_bytes(1))
  (tmp_path / "bad.png").write_bytes(_corrupt_pixels_keep_checksums(_png_bytes(2)))
  pictures = ["good.png", "bad.png"]
  lines = [{"prompt": "q", "answer": "1", field: ["good.png", "good.png"]},
           {"prompt": "q", "answer": "2", field: pictures}]
  for line in lines:
    if field == "video_frames":
      line["video_fps"] = 2.0
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  with pytest.raises(ValueError, match=rf"d\.jsonl:2: {field}\[1\] is not a readable image "
                                       r"\(.*bad\.png: OSError"):
    records.RecordSource(str(path), capability="math", native_media=True)


def test_qwen3_vl_dry_run_rejects_corrupt_pixel_data_naming_the_record(tmp_path):
  """The reported case: a Qwen3-VL run's --dry_run passed and the run failed with
  'broken data stream', naming no record."""
  from copd_jax import main
  data = tmp_path / "vl"
  shutil.copytree(VL_DATA, data)
  good = (data / "image2.png").read_bytes()
  (data / "image2.png").write_bytes(_corrupt_pixels_keep_checksums(good))
  cfg = fixture_configs.load("hf_vl_copd", "math,chart,clip,micro")
  cfg.workdir = str(tmp_path / "run")
  cfg.data.train_files.chart = str(data / "image.jsonl")
  with pytest.raises(ValueError, match=r"image\.jsonl:3 \(id i2\): images\[0\] is not a "
                                       r"readable image"):
    main.dry_run(cfg)


def test_picture_that_breaks_after_loading_is_named_when_read(tmp_path):
  (tmp_path / "a.png").write_bytes(_png_bytes())
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"prompt": "q", "answer": "1", "images": ["a.png"]}) + "\n")
  source = records.RecordSource(str(path), capability="math", native_media=True)
  (tmp_path / "a.png").write_bytes(_corrupt_pixels_keep_checksums(_png_bytes()))
  with pytest.raises(ValueError, match=r"d\.jsonl:1: cannot decode its pictures \(OSError"):
    source[0]


def test_a_5000_digit_integer_in_a_record_names_file_and_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "q", "answer": "1"}\n{"prompt": "q", "answer": "1", "n": '
                  + "7" * 5000 + "}\n")
  with pytest.raises(ValueError, match=r"d\.jsonl:2: unreadable JSON value \(Exceeds the "
                                       r"limit \(4300 digits\)"):
    records.RecordSource(str(path), capability="math")
