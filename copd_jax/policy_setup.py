"""Turns a run config into the objects every method needs: model config, tokenizer,
the per-capability held-out sets, and array encoders bound to the config's lengths."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import ml_collections

from copd_jax import model as model_lib
from copd_jax import tasks
from copd_jax.tokenizer import ToyTokenizer


def never_generated_ids(tokenizer) -> tuple[int, ...]:
  """Specials a response must never contain: <pad>, <bos> and the <img> placeholder."""
  return (tokenizer.pad_id, tokenizer.bos_id, tokenizer.image_id)


@dataclasses.dataclass(frozen=True)
class RunSetup:
  model_cfg: model_lib.ModelConfig
  tokenizer: ToyTokenizer
  capabilities: tuple[str, ...]
  encode_prompts: Callable[[Sequence[tasks.Example]], tasks.PromptBatch]
  encode_sft_batch: Callable[[Sequence[tasks.Example]], dict]
  example_kwargs: dict  # image_size / num_frames shared by every generator call


def build_setup(cfg: ml_collections.ConfigDict) -> RunSetup:
  tokenizer = ToyTokenizer()
  if cfg.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size must be >= the tokenizer's vocabulary "
                     f"({tokenizer.vocab_size}), got {cfg.model.vocab_size}")
  if cfg.model.image_token_id != tokenizer.image_id:
    raise ValueError(f"config.model.image_token_id must equal the tokenizer's <img> id "
                     f"({tokenizer.image_id}), got {cfg.model.image_token_id}")
  model_cfg = model_lib.ModelConfig(**cfg.model.to_dict())
  model_cfg.validate()
  vision = model_cfg.vision
  lengths = dict(num_vision_tokens=vision.num_tokens, num_frames=vision.num_frames,
                 image_size=vision.image_size)
  return RunSetup(
      model_cfg=model_cfg,
      tokenizer=tokenizer,
      capabilities=tuple(cfg.tasks.capabilities),
      encode_prompts=functools.partial(
          tasks.encode_prompts, tokenizer=tokenizer,
          max_prompt_len=cfg.data.max_prompt_len, **lengths),
      encode_sft_batch=functools.partial(
          tasks.encode_sft_batch, tokenizer=tokenizer, max_prompt_len=cfg.data.max_prompt_len,
          max_response_len=cfg.data.max_response_len, **lengths),
      example_kwargs=dict(image_size=vision.image_size, num_frames=vision.num_frames),
  )


def held_out_sets(cfg: ml_collections.ConfigDict, setup: RunSetup) -> dict[str, list]:
  """The fixed evaluation examples of each capability (never in any train stream)."""
  return {cap: tasks.eval_set(cap, cfg.eval.num_examples, seed=cfg.tasks.seed,
                              difficulty=cfg.tasks.difficulty[cap], **setup.example_kwargs)
          for cap in setup.capabilities}
