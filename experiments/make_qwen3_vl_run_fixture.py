"""Writes the fixtures of the end-to-end Qwen3-VL CoPD run (committed; tiny):

    python experiments/make_qwen3_vl_run_fixture.py

tests/fixtures/hf/qwen3_vl_run/   a random tiny Qwen3-VL checkpoint whose vocabulary and
    vision token ids match the tiny Qwen3 tokenizer fixture (tests/fixtures/hf/qwen3_tiny/
    tokenizer, copied), with a Qwen3-VL-style chat template (image and video content items
    become <|vision_start|><|image_pad|><|vision_end|> / ...<|video_pad|>...) and processor
    settings (preprocessor_config.json, video_preprocessor_config.json: patch 8, merge 2,
    temporal patch 2). Architecture: the transformers-made tests/fixtures/hf/qwen3_vl_tiny
    config with the token ids and vocabulary changed; weights from our own init, written by
    our exporter (models/qwen3_vl_export.py), so this needs no torch.
tests/fixtures/data/vl/{text,image,video}.jsonl + PNGs: a few records per domain; the image
    records use pictures of two sizes, the video records 3 frames each at 2 frames/s.
Deterministic (seed 0): rerunning it rewrites the same files.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from PIL import Image  # noqa: E402

from copd_jax.models import qwen3_vl, qwen3_vl_export  # noqa: E402
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
SOURCE = os.path.join(ROOT, "hf", "qwen3_vl_tiny")
TOKENIZER = os.path.join(ROOT, "hf", "qwen3_tiny", "tokenizer")
OUT = os.path.join(ROOT, "hf", "qwen3_vl_run")
DATA = os.path.join(ROOT, "data", "vl")
VOCAB = 352  # the tokenizer has 330 ids; the embedding is padded past it, as in Qwen3
TOKEN_IDS = dict(vision_start_token_id=3, vision_end_token_id=4, image_token_id=5,
                 video_token_id=6)  # the tokenizer fixture's ids of those special tokens
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
PROCESSOR = {"patch_size": 8, "merge_size": 2, "temporal_patch_size": 2,
             "size": {"shortest_edge": 64, "longest_edge": 4096},
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def write_json(obj, path):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def checkpoint() -> None:
  config = json.load(open(os.path.join(SOURCE, "config.json")))
  config.update(TOKEN_IDS)
  config["text_config"]["vocab_size"] = VOCAB
  cfg = Qwen3VLConfig.from_hf(config)
  params = qwen3_vl.init_params(cfg, jax.random.key(0))
  os.makedirs(OUT, exist_ok=True)
  with tempfile.TemporaryDirectory() as source:  # the exporter copies config.json from here
    write_json(config, os.path.join(source, "config.json"))
    qwen3_vl_export.export_qwen3_vl(OUT, params, cfg, source_dir=source, dtype="float32")
  shutil.copy(os.path.join(TOKENIZER, "tokenizer.json"), os.path.join(OUT, "tokenizer.json"))
  tokenizer_config = json.load(open(os.path.join(TOKENIZER, "tokenizer_config.json")))
  tokenizer_config["chat_template"] = CHAT_TEMPLATE
  write_json(tokenizer_config, os.path.join(OUT, "tokenizer_config.json"))
  write_json(PROCESSOR, os.path.join(OUT, "preprocessor_config.json"))
  write_json(dict(PROCESSOR, fps=2.0), os.path.join(OUT, "video_preprocessor_config.json"))


def picture(rng, height, width, name) -> str:
  Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(
      os.path.join(DATA, name))
  return name


def records() -> None:
  rng = np.random.default_rng(0)
  os.makedirs(DATA, exist_ok=True)
  text = [{"id": f"t{i}", "prompt": f"What is {a} + {b}?", "answer": str(a + b),
           "capability": "math", "verifier": "integer"}
          for i, (a, b) in enumerate([(2, 3), (4, 1), (5, 2), (1, 1)])]
  image = [{"id": f"i{i}", "prompt": "How many red squares?", "answer": str(i % 3),
            "capability": "chart", "verifier": "integer",
            "images": [picture(rng, h, w, f"image{i}.png")]}
           for i, (h, w) in enumerate([(32, 48), (16, 16), (32, 48), (16, 16)])]
  video = [{"id": f"v{i}", "prompt": "How many frames show a dot?", "answer": str(1 + i % 3),
            "capability": "clip", "verifier": "integer",
            "video_frames": [picture(rng, 16, 16, f"video{i}_{k}.png") for k in range(3)],
            "video_fps": 2.0}
           for i in range(3)]
  for name, rows in (("text", text), ("image", image), ("video", video)):
    with open(os.path.join(DATA, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
  checkpoint()
  records()
  print(f"wrote {OUT} and {DATA}")
