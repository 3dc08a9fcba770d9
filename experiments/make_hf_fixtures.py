"""Regenerates tests/fixtures/hf/qwen3_tiny/ with transformers (the reference implementation).

Needs torch + transformers + tokenizers, which copd-jax itself does not depend on; run it
from a separate environment, e.g.

    python3 -m venv /work/hfref-venv
    /work/hfref-venv/bin/pip install torch transformers safetensors numpy tokenizers
    /work/hfref-venv/bin/python experiments/make_hf_fixtures.py

What it writes (all tiny; the whole folder stays well under 1 MB):
  tokenizer/          tokenizer.json: a byte-level BPE trained here on CORPUS with Qwen's
                      special tokens; tokenizer_config.json with our own Qwen-style chat
                      template (CHAT_TEMPLATE; it honours enable_thinking=False like Qwen3's).
  untied_f32/         a random Qwen3ForCausalLM (untied head), float32 model.safetensors.
  tied_bf16/          a random tied Qwen3ForCausalLM saved in bfloat16, one file ...
  tied_bf16_sharded/  ... and the same weights in several shards + model.safetensors.index.json.
  reference.npz       tokens/mask/positions int[B, T] (LEFT-padded batch; padded slots hold
                      arbitrary ids, which the mask must hide) and f32 logits [B, T, V] of
                      both models, computed in float32 from the weights as stored (the bf16
                      model is reloaded as float32). Positions follow copd_jax.models.decoder:
                      positions = max(cumsum(mask) - 1, 0), passed to transformers as
                      position_ids (its default would count the padding). Logits at padded
                      positions are meaningless; tests compare mask == 1 positions only.
  tokenizer_reference.json  the transformers tokenizer's encode/decode of STRINGS and its
                      apply_chat_template output (text and ids) for CHATS.

`verify-export DIR` loads an exported directory (copd_jax.models.hf_checkpoint.export_qwen3 of the
untied fixture) with transformers and prints the largest logit difference from
reference.npz, checking that transformers accepts our export.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_DIR = os.path.join(HERE, "..", "tests", "fixtures", "hf", "qwen3_tiny")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Added but not special (decode keeps them), as in Qwen3.
PLAIN_ADDED_TOKENS = ["<think>", "</think>"]
TOKENIZER_VOCAB = 330  # 256 byte symbols + specials + merges learnt from CORPUS
MODEL_VOCAB = 352      # the embedding is padded past the tokenizer, like released Qwen3

# Ours: one <|im_start|>role\ncontent<|im_end|>\n block per message; the generation prompt
# opens an assistant turn (with an empty think block when enable_thinking is false).
CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "{{- raise_exception('unknown role: ' ~ message['role']) }}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- if enable_thinking is defined and not enable_thinking %}\n"
    "{{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "{%- endif %}\n"
    "{%- endif %}\n")

CORPUS = [
    "What is 12 + 35? The answer is 47.",
    "Solve for x: 3x + 5 = 20, so x = 5.",
    "The quick brown fox jumps over the lazy dog.",
    "Compute the sum of the first ten positive integers: 55.",
    "A triangle has angles of 30, 60 and 90 degrees.",
    "Let me think step by step about the image and the question.",
    "Which option is correct? (A) red (B) green (C) blue (D) yellow",
    "The answer is \\boxed{42}.",
    "Réponse: la valeur est égale à 7 — très bien.",
    "数学 问题 答案",
    "def add(a, b):\n    return a + b\n",
]
STRINGS = [
    "What is 12 + 35?",
    "  leading spaces and\ttabs\nnew lines  ",
    "Réponse: égale — 数学 🙂",
    "The answer is \\boxed{42}.",
    "<|im_start|>user\nhi<|im_end|>",
    "<think>\nok\n</think>\n\nx = 5",
]
CHATS = [
    dict(messages=[{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True),
    dict(messages=[{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Solve 3x = 9."},
                   {"role": "assistant", "content": "x = 3"},
                   {"role": "user", "content": "And 4x = 8?"}], add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=False),
    dict(messages=[{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
         enable_thinking=False),
    dict(messages=[{"role": "user", "content": "<|vision_start|>" + "<|image_pad|>" * 4
                    + "<|vision_end|>What colour is the square?"}],
         add_generation_prompt=True),
]
MODEL_DIMS = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=512)
BATCH_LENGTHS = (12, 8, 3)  # real tokens per row; T = 12, the rest is left padding
SEQ_LEN = 12


def build_tokenizer(out_dir: str) -> None:
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  # Words with an optional leading space, single digits, punctuation runs, whitespace.
  split = pre_tokenizers.Split(
      Regex(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
      behavior="isolated")
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB - len(PLAIN_ADDED_TOKENS),
                                special_tokens=SPECIAL_TOKENS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 4, trainer=trainer)
  tok.add_tokens(PLAIN_ADDED_TOKENS)
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": None,
      "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "clean_up_tokenization_spaces": False,
      "model_max_length": 512,
      "chat_template": CHAT_TEMPLATE,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
    f.write("\n")


def tokenizer_reference(tok_dir: str) -> dict:
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(tok_dir)
  strings = []
  for s in STRINGS:
    ids = tok.encode(s, add_special_tokens=False)
    strings.append(dict(text=s, ids=ids, decoded=tok.decode(ids, skip_special_tokens=True)))
  chats = []
  for chat in CHATS:
    kwargs = {k: v for k, v in chat.items() if k != "messages"}
    text = tok.apply_chat_template(chat["messages"], tokenize=False, **kwargs)
    ids = tok.apply_chat_template(chat["messages"], tokenize=True, return_dict=True,
                                  **kwargs)["input_ids"]
    chats.append(dict(chat, text=text, ids=list(ids)))
  import transformers
  return dict(transformers_version=transformers.__version__, vocab_size=len(tok),
              strings=strings, chats=chats)


def random_qwen3(tied: bool, seed: int):
  import torch
  from transformers import Qwen3Config, Qwen3ForCausalLM
  config = Qwen3Config(vocab_size=MODEL_VOCAB, tie_word_embeddings=tied, **MODEL_DIMS)
  torch.manual_seed(seed)
  model = Qwen3ForCausalLM(config).float().eval()
  with torch.no_grad():  # larger, non-trivial weights (norms away from 1) for a sharp test
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.08 * torch.randn_like(p))
  return model


def reference_batch(seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, MODEL_VOCAB, size=(len(BATCH_LENGTHS), SEQ_LEN)).astype(np.int32)
  mask = np.zeros_like(tokens, dtype=bool)
  for row, length in enumerate(BATCH_LENGTHS):
    mask[row, SEQ_LEN - length:] = True
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def logits_of(model, tokens, mask, positions) -> np.ndarray:
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                position_ids=torch.from_numpy(positions.astype(np.int64)))
  return out.logits.float().numpy()


def load_f32(directory: str):
  import torch
  from transformers import Qwen3ForCausalLM
  return Qwen3ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                          attn_implementation="eager").eval()


def make_fixtures() -> None:
  import torch
  if os.path.isdir(FIXTURE_DIR):
    shutil.rmtree(FIXTURE_DIR)
  tok_dir = os.path.join(FIXTURE_DIR, "tokenizer")
  build_tokenizer(tok_dir)
  with open(os.path.join(FIXTURE_DIR, "tokenizer_reference.json"), "w") as f:
    json.dump(tokenizer_reference(tok_dir), f, indent=1, ensure_ascii=False)
    f.write("\n")

  tokens, mask, positions = reference_batch()
  untied_dir = os.path.join(FIXTURE_DIR, "untied_f32")
  random_qwen3(tied=False, seed=0).save_pretrained(untied_dir, safe_serialization=True)
  tied = random_qwen3(tied=True, seed=1).to(torch.bfloat16)
  tied.save_pretrained(os.path.join(FIXTURE_DIR, "tied_bf16"), safe_serialization=True)
  tied.save_pretrained(os.path.join(FIXTURE_DIR, "tied_bf16_sharded"), safe_serialization=True,
                       max_shard_size="60KB")
  for sub in ("untied_f32", "tied_bf16", "tied_bf16_sharded"):
    gen = os.path.join(FIXTURE_DIR, sub, "generation_config.json")
    if os.path.exists(gen):
      os.remove(gen)  # not needed by either side
  assert os.path.exists(os.path.join(FIXTURE_DIR, "tied_bf16_sharded",
                                     "model.safetensors.index.json")), "not sharded"
  np.savez_compressed(
      os.path.join(FIXTURE_DIR, "reference.npz"), tokens=tokens, mask=mask, positions=positions,
      logits_untied_f32=logits_of(load_f32(untied_dir), tokens, mask, positions),
      logits_tied_bf16=logits_of(load_f32(os.path.join(FIXTURE_DIR, "tied_bf16")), tokens, mask,
                                 positions))
  for folder, _, names in os.walk(FIXTURE_DIR):
    for name in names:
      os.chmod(os.path.join(folder, name), 0o644)  # torch writes 0600
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FIXTURE_DIR) for f in fs)
  print(f"wrote {FIXTURE_DIR}: {total / 1e3:.0f} kB")


def verify_export(directory: str) -> None:
  ref = np.load(os.path.join(FIXTURE_DIR, "reference.npz"))
  logits = logits_of(load_f32(directory), ref["tokens"], ref["mask"], ref["positions"])
  diff = np.abs(logits - ref["logits_untied_f32"])[ref["mask"]].max()
  print(f"transformers loaded {directory}: max |logits - reference| = {diff:.3g}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("command", nargs="?", default="make", choices=("make", "verify-export"))
  parser.add_argument("directory", nargs="?")
  args = parser.parse_args()
  if args.command == "make":
    make_fixtures()
  else:
    verify_export(args.directory)


if __name__ == "__main__":
  main()
