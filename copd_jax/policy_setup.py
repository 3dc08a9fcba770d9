"""Turns a run config into the objects every method needs: model config, tokenizer,
the per-capability held-out sets, and array encoders bound to the config's lengths.

Two kinds of run:
* the toy suite (default): ToyTokenizer, the config's model, procedural tasks;
* a Hugging Face checkpoint (`config.init.hf_checkpoint`): the model config comes from its
  config.json (hf_config.model_config_from_hf; compute dtype = config.model.dtype, the
  rest of config.model is ignored), the tokenizer from its tokenizer files
  (`config.init.hf_tokenizer` when set, else the checkpoint directory), prompts are
  chat-rendered, and responses stop at the chat end token (HFTokenizer.eos_id).
Training and held-out data come from record files (`config.data.train_files` /
`eval_files`, copd_jax/data/records.py) when given, else from the procedural suite.

A Qwen3-VL checkpoint (config.json model_type 'qwen3_vl') trains on record files only:
its records keep their pictures at their own sizes (Example.media), prompts are built by
the checkpoint's own chat template and image / video processor settings
(data/vl_prompts.py), and every prompt's media are padded to one vision budget
(`config.data.vision_budget` patches; 0 = the most any record needs), so a step compiles
once for any mix of image sizes, videos and text. Every record is measured at setup
(prompt tokens, patches), before anything compiles.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from copd_jax.data import examples as examples_lib, records as datasets, reward_fns, toy_tasks
from copd_jax.data.tokenizer import Tokenizer, ToyTokenizer
from copd_jax.models import model_config
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig
from copd_jax.run_spec import RunSpec

if TYPE_CHECKING:
  from copd_jax.models.policy import Policy


def never_generated_ids(tokenizer) -> tuple[int, ...]:
  """Specials a response must never contain: <pad>, <bos> and the <img> placeholder --
  those the tokenizer has (an id outside the vocabulary, e.g. image_id = -1 for a
  tokenizer without one, is skipped) and never the stop token (eos)."""
  ids = []
  for token in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.image_id):
    if (isinstance(token, int) and 0 <= token < tokenizer.vocab_size
        and token != tokenizer.eos_id and token not in ids):
      ids.append(token)
  return tuple(ids)


@dataclasses.dataclass(frozen=True)
class RunSetup:
  model_cfg: model_config.ModelConfig | Qwen3VLConfig
  tokenizer: Tokenizer
  capabilities: tuple[str, ...]
  encode_prompts: Callable[[Sequence[examples_lib.Example]], examples_lib.PromptBatch]
  encode_sft_batch: Callable[[Sequence[examples_lib.Example]], dict]
  # image_size / num_frames shared by every generator call and RecordSource; both 0 for
  # a text-only model (no vision tower: PromptBatch.frames is None). Qwen3-VL:
  # native_media=True (records keep their pictures' own sizes).
  example_kwargs: dict
  # Token ids that stand for media in a prompt (Qwen3-VL's image / video pads): a
  # response must never contain them either.
  media_token_ids: tuple[int, ...] = ()
  # How responses are scored (config.reward): passed to every scorer, never a global.
  rewards: reward_fns.Rewards = reward_fns.Rewards()

  @property
  def policy(self) -> Policy:
    """The models.policy Policy of model_cfg: what the sampler and the scorers run."""
    from copd_jax.models.policy import policy_of  # the model code, imported when used
    return policy_of(self.model_cfg)

  @property
  def banned_token_ids(self) -> tuple[int, ...]:
    """Ids the sampler never draws (never_generated_ids + media_token_ids)."""
    ids = never_generated_ids(self.tokenizer)
    return ids + tuple(t for t in self.media_token_ids if t not in ids)


def uses_record_files(cfg: RunSpec) -> bool:
  from copd_jax.data import sources as sources_lib
  return bool(cfg.data.train_files) or sources_lib.has_sources(cfg.data)


def hf_tokenizer_dir(cfg: RunSpec) -> str:
  return cfg.init.hf_tokenizer or cfg.init.hf_checkpoint


def with_execution_settings(model_cfg: model_config.ModelConfig,
                            cfg: RunSpec) -> model_config.ModelConfig:
  """A checkpoint's decoder config with config.model's execution settings (remat, the
  attention block and kernel): how to compute, which the checkpoint does not say."""
  return dataclasses.replace(model_cfg, remat=bool(cfg.model.remat),
                             attention_block=int(cfg.model.attention_block),
                             attention_kernel=str(cfg.model.attention_kernel),
                             scan_layers=bool(cfg.model.scan_layers))


def chat_options(cfg) -> dict:
  """HFTokenizer's system_prompt / chat_template_kwargs from config.data."""
  return dict(system_prompt=str(cfg.data.system_prompt),
              chat_template_kwargs=dict(cfg.data.chat_template_kwargs))


def _hf_model_and_tokenizer(cfg) -> tuple[model_config.ModelConfig, Tokenizer]:
  from copd_jax.data import hf_tokenizer
  from copd_jax.models import hf_checkpoint
  model_cfg = hf_checkpoint.model_config_from_hf(
      hf_checkpoint.read_hf_config(cfg.init.hf_checkpoint), dtype=cfg.model.dtype)
  hf_checkpoint.check_layers_present(cfg.init.hf_checkpoint, model_cfg)  # headers only
  model_cfg = with_execution_settings(model_cfg, cfg)
  tokenizer = hf_tokenizer.HFTokenizer(hf_tokenizer_dir(cfg), model_vocab_size=model_cfg.vocab_size,
                                       **chat_options(cfg))
  if tokenizer.vocab_size != model_cfg.vocab_size:
    raise ValueError(f"the tokenizer in {hf_tokenizer_dir(cfg)} has {tokenizer.vocab_size} ids, "
                     f"more than the checkpoint's {model_cfg.vocab_size} embedding rows")
  return model_cfg, tokenizer


def _toy_model_and_tokenizer(cfg) -> tuple[model_config.ModelConfig, Tokenizer]:
  tokenizer = ToyTokenizer()
  if cfg.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size must be >= the tokenizer's vocabulary "
                     f"({tokenizer.vocab_size}), got {cfg.model.vocab_size}")
  if cfg.model.image_token_id != tokenizer.image_id:
    raise ValueError(f"config.model.image_token_id must equal the tokenizer's <img> id "
                     f"({tokenizer.image_id}), got {cfg.model.image_token_id}")
  return cfg.model, tokenizer  # a ModelConfig, validated when the RunSpec was built


def vision_lengths(model_cfg: model_config.ModelConfig) -> dict:
  """num_vision_tokens / num_frames / image_size of the model (all 0 without vision)."""
  vision = model_cfg.vision
  if vision is None:
    return dict(num_vision_tokens=0, num_frames=0, image_size=0)
  return dict(num_vision_tokens=vision.num_tokens, num_frames=vision.num_frames,
              image_size=vision.image_size)


def init_policy_params(model_cfg, key):
  """Fresh f32 parameters of one policy of either family (for shapes: eval_shape).
  model_cfg: a model config or a models.policy Policy."""
  from copd_jax.models.policy import policy_of
  return policy_of(model_cfg).init_params(key)


def declared_param_axes(model_cfg) -> dict:
  """{parameter path: logical axes} that the layers of one policy of either family declare
  (for sharding.RunSharding(mesh, param_axes=...)); nothing is allocated."""
  from copd_jax.models.policy import policy_of
  return policy_of(model_cfg).param_axes()


def to_model_layout(params, model_cfg, leading_axes: int = 0):
  """Params (unrolled `layers_{i}`, as the HF importers give them, or stacked) in the
  layer layout model_cfg runs with (ModelConfig.scan_layers: stacked `layers` [L, ...])."""
  from copd_jax.models import layer_stack
  from copd_jax.models.policy import policy_of
  return layer_stack.to_layout(params, policy_of(model_cfg).text.scan_layers, leading_axes)


def is_qwen3_vl_checkpoint(directory: str) -> bool:
  """True when a checkpoint's config.json says model_type 'qwen3_vl'."""
  from copd_jax.models import hf_config
  return bool(directory) and hf_config.read_hf_config(directory).get("model_type") == "qwen3_vl"


def build_setup(cfg: RunSpec) -> RunSetup:
  if is_qwen3_vl_checkpoint(cfg.init.hf_checkpoint):
    return _build_vl_setup(cfg)
  if cfg.init.hf_checkpoint:
    model_cfg, tokenizer = _hf_model_and_tokenizer(cfg)
  else:
    model_cfg, tokenizer = _toy_model_and_tokenizer(cfg)
  lengths = vision_lengths(model_cfg)
  example_kwargs = dict(image_size=lengths["image_size"], num_frames=lengths["num_frames"])
  if not uses_record_files(cfg) and cfg.data.conflict:
    # The divergence dial (toy_tasks, CONFLICT_FAMILIES): RL streams and held-out sets.
    example_kwargs["conflict"] = float(cfg.data.conflict)
  setup = RunSetup(
      model_cfg=model_cfg,
      tokenizer=tokenizer,
      capabilities=tuple(cfg.tasks.capabilities),
      encode_prompts=functools.partial(
          examples_lib.encode_prompts, tokenizer=tokenizer,
          max_prompt_len=cfg.data.max_prompt_len, **lengths),
      encode_sft_batch=functools.partial(
          examples_lib.encode_sft_batch, tokenizer=tokenizer, max_prompt_len=cfg.data.max_prompt_len,
          max_response_len=cfg.data.max_response_len, **lengths),
      example_kwargs=example_kwargs,
      rewards=reward_fns.rewards_of(cfg.reward),
  )
  if model_cfg.vision is None:
    pictured = [cap for cap in setup.capabilities if cap in ("image", "video")
                and not uses_record_files(cfg)]
    if pictured:
      raise ValueError(f"config.tasks.capabilities has {pictured}, but the model "
                       f"({cfg.init.hf_checkpoint or 'config.model'}) has no vision tower")
  if uses_record_files(cfg):
    for field in ("train_files", "eval_files"):
      check_record_prompt_lengths(cfg, setup, field)
  return setup


class ChainedSource:
  """A domain's record sources read one after the other (config.data.sources of a split,
  in name order): .records, len and [i] as a RecordSource."""

  def __init__(self, parts):
    self.parts = list(parts)
    self.records = tuple(r for part in self.parts for r in part.records)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int):
    for part in self.parts:
      if index < len(part):
        return part[index]
      index -= len(part)
    raise IndexError(index)


def record_source(cfg: RunSpec, setup: RunSetup, field: str,
                  capability: str) -> datasets.RecordSource | ChainedSource:
  """The RecordSource of config.data.<field>[capability] (field: train_files / eval_files),
  or with config.data.sources that capability's sources of the split, each with its own
  columns, chained in name order; errors name the config field."""
  from copd_jax.data import sources as sources_lib
  if sources_lib.has_sources(cfg.data):
    split = "train" if field == "train_files" else "eval"
    specs = sources_lib.by_domain(sources_lib.all_sources(cfg.data), split).get(capability)
    if not specs:
      raise ValueError(f"config.data.sources has no {split!r} source for capability "
                       f"{capability!r}")
    return ChainedSource(datasets.RecordSource(
        s.paths, capability=capability, reader=cfg.data.reader, columns=s.columns,
        reward_config=setup.rewards.config, **setup.example_kwargs) for s in specs)
  files = getattr(cfg.data, field)
  if capability not in files:
    raise ValueError(f"config.data.{field} has no entry for capability {capability!r} "
                     f"(it names {sorted(files)})")
  return datasets.RecordSource(files[capability], capability=capability,
                               reward_config=setup.rewards.config,
                               **record_options(cfg), **setup.example_kwargs)


def record_options(cfg: RunSpec) -> dict:
  """RecordSource's reader / columns from config.data."""
  return dict(reader=cfg.data.reader, columns=dict(cfg.data.columns))


def check_record_prompt_lengths(cfg, setup: RunSetup, field: str) -> None:
  """Every record's prompt (chat-rendered, vision placeholders included) must fit
  config.data.max_prompt_len: a too-long prompt is an error naming the record -- never
  silently truncated, since a cut question is a different question."""
  num_vision_tokens = vision_lengths(setup.model_cfg)["num_vision_tokens"]
  for capability in setup.capabilities:
    for record in record_source(cfg, setup, field, capability).records:
      n = len(examples_lib.prompt_token_ids(_prompt_only_example(record), setup.tokenizer,
                                     num_vision_tokens))
      if n > cfg.data.max_prompt_len:
        raise ValueError(f"{record.where}: the prompt needs {n} tokens (chat template and "
                         f"vision placeholders included), more than config.data."
                         f"max_prompt_len={cfg.data.max_prompt_len}; raise it or drop the "
                         f"record (config.data.{field}['{capability}'])")


def _prompt_only_example(record: datasets.Record) -> examples_lib.Example:
  """The record as an Example for counting prompt tokens (placeholder pixels, not decoded)."""
  frames = None if record.modality == "text" else np.zeros((1, 1, 1, 3), np.float32)
  return examples_lib.Example(record.capability, record.prompt, record.answer, record.solution,
                       frames, verifier=record.verifier, modality=record.modality,
                       record=record.where)


def held_out_sets(cfg: RunSpec, setup: RunSetup) -> dict[str, list]:
  """The fixed evaluation examples of each capability (never in any train stream).

  With record files: the first config.eval.num_examples records of
  config.data.eval_files[capability], in file order. Otherwise the procedural eval split.
  """
  if uses_record_files(cfg):
    sets = {}
    for cap in setup.capabilities:
      source = record_source(cfg, setup, "eval_files", cap)
      sets[cap] = [source[i] for i in range(min(len(source), cfg.eval.num_examples))]
    return sets
  return {cap: toy_tasks.eval_set(cap, cfg.eval.num_examples, seed=cfg.tasks.seed,
                              difficulty=cfg.tasks.difficulty[cap], **setup.example_kwargs)
          for cap in setup.capabilities}


def vl_model_config(cfg: RunSpec) -> Qwen3VLConfig:
  """The Qwen3VLConfig of config.init.hf_checkpoint, with the compute dtype and the
  execution settings (remat, attention) of config.model; errors name config.json."""
  from copd_jax.models import hf_config
  path = f"{cfg.init.hf_checkpoint}/config.json"
  try:
    model_cfg = Qwen3VLConfig.from_hf(hf_config.read_hf_config(cfg.init.hf_checkpoint),
                                      dtype=cfg.model.dtype)
  except ValueError as err:
    raise ValueError(f"{path}: {err}") from err
  from copd_jax.models import qwen3_vl_import
  qwen3_vl_import.check_layer_counts(cfg.init.hf_checkpoint, model_cfg)  # headers only
  return dataclasses.replace(model_cfg, text=with_execution_settings(model_cfg.text, cfg))


def _no_sft_batches(examples):
  raise ValueError("a Qwen3-VL checkpoint is its own base: there is no SFT warm-start "
                   "(config.warm_start.mix must be empty)")


def _build_vl_setup(cfg: RunSpec) -> RunSetup:
  from copd_jax.data import vl_prompts
  if not uses_record_files(cfg):
    raise ValueError(f"config.init.hf_checkpoint={cfg.init.hf_checkpoint!r} is a Qwen3-VL "
                     "checkpoint, which trains on record files: set config.data.train_files "
                     "and eval_files (the procedural suite is drawn as the toy model's "
                     "fixed-size frames)")
  model_cfg = vl_model_config(cfg)
  processor = vl_prompts.VLPromptProcessor.from_checkpoint(
      cfg.init.hf_checkpoint, tokenizer_dir=hf_tokenizer_dir(cfg),
      model_vocab_size=model_cfg.text.vocab_size, **chat_options(cfg))
  if processor.tokenizer.vocab_size != model_cfg.text.vocab_size:
    raise ValueError(f"the tokenizer in {hf_tokenizer_dir(cfg)} has "
                     f"{processor.tokenizer.vocab_size} ids, more than the checkpoint's "
                     f"{model_cfg.text.vocab_size} embedding rows")
  example_kwargs = dict(native_media=True)
  partial_setup = RunSetup(model_cfg, processor.tokenizer, tuple(cfg.tasks.capabilities),
                           encode_prompts=None, encode_sft_batch=_no_sft_batches,
                           example_kwargs=example_kwargs,
                           media_token_ids=(model_cfg.image_token_id, model_cfg.video_token_id),
                           rewards=reward_fns.rewards_of(cfg.reward))
  budget = check_vl_records(cfg, partial_setup, processor)
  encode = functools.partial(vl_prompts.encode_prompt_batch, processor=processor,
                             model_cfg=model_cfg, max_prompt_len=cfg.data.max_prompt_len,
                             vision_budget=budget)
  return dataclasses.replace(partial_setup, encode_prompts=encode)


def _record_sizes(record: datasets.Record) -> tuple[list, tuple | None]:
  """(image sizes [(H, W)], video shape (F, H, W) or None) of a record, from headers."""
  sizes = [datasets.picture_size(p) for p in record.pictures]
  if record.modality == "image":
    return sizes, None
  if record.modality == "video":
    if len(set(sizes)) > 1:
      raise ValueError(f"{record.where}: the video's frames have different sizes "
                       f"{sorted(set(sizes))}")
    return [], (len(sizes),) + sizes[0]
  return [], None


def check_vl_records(cfg, setup: RunSetup, processor) -> int:
  """Measures every train and eval record of a Qwen3-VL run (from picture headers: no
  pixels decoded) and returns the vision budget in patches per prompt.

  Errors name the record (and the config field to change): a prompt over
  config.data.max_prompt_len, media over config.data.vision_budget, a grid the patch
  merger cannot split, a video without video_fps. Budget 0 = the most any record needs,
  rounded up to a multiple of merge_size^2."""
  unit = setup.model_cfg.vision.merge_unit
  budget = int(cfg.data.vision_budget)
  if budget % unit:
    raise ValueError(f"config.data.vision_budget={budget} must be a multiple of the patch "
                     f"merger's merge_size^2 = {unit}")
  most = unit
  for field in ("train_files", "eval_files"):
    for capability in setup.capabilities:
      for record in record_source(cfg, setup, field, capability).records:
        image_sizes, video_shape = _record_sizes(record)
        try:
          tokens, patches = processor.measure(record.prompt, image_sizes, video_shape,
                                              record.video_fps, where=record.where)
        except ValueError as err:
          where = "" if str(err).startswith(record.where) else f"{record.where}: "
          raise ValueError(f"{where}{err} (config.data.{field}['{capability}'])") from err
        if tokens > cfg.data.max_prompt_len:
          raise ValueError(f"{record.where}: the prompt needs {tokens} tokens (chat template "
                           f"and vision placeholders included), more than config.data."
                           f"max_prompt_len={cfg.data.max_prompt_len}; raise it or drop the "
                           f"record (config.data.{field}['{capability}'])")
        if budget and patches > budget:
          raise ValueError(f"{record.where}: its images and video make {patches} patches, "
                           f"more than config.data.vision_budget={budget}; raise it, resize "
                           f"the media or drop the record (config.data.{field}['{capability}'])")
        most = max(most, patches)
  return budget or -(-most // unit) * unit
