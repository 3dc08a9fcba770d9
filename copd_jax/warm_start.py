"""The base policy: a local Hugging Face checkpoint (config.init.hf_checkpoint), or the
toy suite's SFT warm-start, which trains one policy on worked solutions of all capabilities.

This is the toy analog of the paper's instruction-tuned base (Qwen3-VL-4B-Instruct):
partially competent on every capability, so RL has room to help. `warm_start.mix`
sets how much of each capability it sees, `warm_start.steps` how long it trains.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from copd_jax import checkpoint
from copd_jax.data import examples as examples_lib, toy_flaws, toy_tasks
from copd_jax.models import decoder, model_config
from copd_jax.policy_setup import RunSetup, to_model_layout
from copd_jax.run_log import MetricsWriter, ProgressLine
from copd_jax.run_spec import RunSpec, WarmStartSpec


def sft_loss(params: Any, batch: dict, model_cfg: model_config.ModelConfig) -> jax.Array:
  """Mean next-token NLL over response tokens.

  batch: tokens int32[B, T], mask bool[B, T], loss_mask f32[B, T] (1 where token t+1 is a
  response token), frames f32[B, F, H, W, C].
  """
  tokens, mask = batch["tokens"], batch["mask"]
  hidden = decoder.forward_hidden(params, model_cfg, tokens, decoder.positions_from_mask(mask), mask,
                                    batch["frames"])
  # The toy vocabulary is tiny, so dense logits are fine here; RL uses the fused kernels.
  logits = decoder.logits_from_hidden(hidden[:, :-1], decoder.lm_head(params, model_cfg))
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
  weights = batch["loss_mask"][:, :-1]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_optimizer(ws: WarmStartSpec) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, ws.learning_rate, warmup_steps=max(ws.warmup_steps, 1),
      decay_steps=max(ws.steps, ws.warmup_steps + 1), end_value=ws.learning_rate * 0.1)
  return optax.chain(optax.clip_by_global_norm(ws.grad_clip_norm),
                     optax.adamw(schedule, weight_decay=ws.weight_decay))


@functools.partial(jax.jit, static_argnames=("model_cfg", "optimizer"), donate_argnums=(0, 1))
def sft_step(params, opt_state, batch, model_cfg, optimizer):
  loss, grads = jax.value_and_grad(sft_loss)(params, batch, model_cfg)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def sft_examples(cfg: RunSpec, setup: RunSetup) -> Iterator[examples_lib.Example]:
  weights = {cap: cfg.warm_start.mix.get(cap, 0.0) for cap in setup.capabilities}
  seed = cfg.tasks.seed + cfg.warm_start.seed
  # One base for every level of the divergence dial: its demonstrations of a conflict
  # family show the shared form at toy_tasks.SFT_CONFLICT, whatever config.data.conflict
  # is (no effect on the other families).
  kwargs = dict(setup.example_kwargs, conflict=toy_tasks.SFT_CONFLICT)
  examples = toy_tasks.mixed_train_stream(weights, seed=seed, difficulty=dict(cfg.tasks.difficulty),
                                      **kwargs)
  # A fraction of the demonstrations shows each capability's flawed procedure (see
  # toy_flaws.FLAW_KINDS): the base knows the right procedure but does not prefer it.
  flaw_rate = {cap: cfg.warm_start.flaw_rate.get(cap, 0.0) for cap in setup.capabilities}
  return toy_flaws.with_flawed_demonstrations(examples, flaw_rate, seed=seed)


def base_policy_metadata(cfg: RunSpec) -> dict:
  """What determines the base policy; a saved base is reused only if this matches."""
  ws = {k: v for k, v in dataclasses.asdict(cfg.warm_start).items()
        if k not in ("checkpoint_dir", "reuse_checkpoint", "log_every", "seed")}
  if not any(ws.get("flaw_rate", {}).values()):
    ws.pop("flaw_rate", None)  # no flawed demonstrations: a base saved before the field
  # The base has its own seed: RL runs with other config.seed values share one base.
  # Only fields that change the trained weights: remat and attention_block (memory/compute
  # trades, model.EXECUTION_FIELDS) and the record-file fields (unused by the toy base)
  # are left out, so adding such fields never invalidates a saved base.
  model = {k: v for k, v in dataclasses.asdict(cfg.model).items()
           if k not in model_config.EXECUTION_FIELDS + model_config.RUN_ONLY_FIELDS}
  if not model.get("scan_layers"):
    model.pop("scan_layers", None)  # unrolled: a base saved before the field still matches
  data = {k: getattr(cfg.data, k) for k in ("max_prompt_len", "max_response_len")}
  return {"model": model, "tasks": dataclasses.asdict(cfg.tasks), "data": data,
          "warm_start": ws, "seed": cfg.warm_start.seed}


def base_policy_dir(cfg: RunSpec) -> str:
  return cfg.warm_start.checkpoint_dir or os.path.join(cfg.workdir, "base_policy")


def train_base_policy(cfg: RunSpec, setup: RunSetup,
                      writer: MetricsWriter | None = None) -> Any:
  """Runs the SFT warm-start from a fresh init; returns float32 params."""
  ws = cfg.warm_start
  params = decoder.init_params(setup.model_cfg, jax.random.key(ws.seed))
  optimizer = make_optimizer(ws)
  opt_state = optimizer.init(params)
  examples = sft_examples(cfg, setup)
  progress = ProgressLine("warm-start", ws.steps, ws.log_every)
  for step in range(1, ws.steps + 1):
    batch_np = setup.encode_sft_batch([next(examples) for _ in range(ws.batch_size)])
    batch = {k: jnp.asarray(batch_np[k]) for k in ("tokens", "mask", "loss_mask", "frames")}
    params, opt_state, loss = sft_step(params, opt_state, batch, setup.model_cfg, optimizer)
    if step % ws.log_every == 0 or step == ws.steps:
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(f"warm-start loss became {loss} at step {step}; "
                                 "lower config.warm_start.learning_rate")
      progress.update(step, int(batch_np["mask"].sum()), loss=loss)
      if writer is not None:
        writer.write(step, {"warm_start/loss": loss})
    else:
      progress.update(step, int(batch_np["mask"].sum()))
  return params


def load_hf_base_policy(cfg: RunSpec, setup: RunSetup) -> Any:
  """The f32 parameters of config.init.hf_checkpoint (hf_checkpoint.load_qwen3); the
  checkpoint must still match the model config build_setup read from it."""
  # Compared with the execution settings build_setup took from config.model.
  model_cfg, params = setup.policy.load_hf(cfg.init.hf_checkpoint)
  if model_cfg != setup.model_cfg:
    raise ValueError(f"{cfg.init.hf_checkpoint}: config.json changed since the run was set up "
                     f"({model_cfg} != {setup.model_cfg})")
  # HF checkpoints number their layers; config.model.scan_layers stacks them.
  return to_model_layout(params, setup.model_cfg)


def get_base_policy(cfg: RunSpec, setup: RunSetup,
                    writer: MetricsWriter | None = None) -> tuple[Any, bool]:
  """Loads config.init.hf_checkpoint if set (no SFT: the released model is the base);
  else loads a matching saved base policy or trains and saves one.

  Returns (params, loaded_from_disk). A saved base made by another recipe raises
  checkpoint.CheckpointMismatchError rather than being silently overwritten; delete it or
  point config.warm_start.checkpoint_dir elsewhere.
  """
  if cfg.init.hf_checkpoint:
    return load_hf_base_policy(cfg, setup), True
  directory = base_policy_dir(cfg)
  metadata = base_policy_metadata(cfg)
  abstract = lambda: jax.eval_shape(lambda k: decoder.init_params(setup.model_cfg, k),
                                    jax.random.key(0))
  unverified = bool(cfg.checkpoint.allow_unverified)
  if cfg.warm_start.reuse_checkpoint and checkpoint.has_policy(directory):
    return checkpoint.load_policy(directory, abstract(), metadata,
                                  allow_unverified=unverified), True
  # One writer: two runs sharing warm_start.checkpoint_dir must not both train and save
  # into it (orbax fails with FileExistsError mid-save). The second gets an error naming
  # the holder's pid. Process 0 holds it for all processes of a multi-process run.
  from copd_jax import run_dir
  with (run_dir.DirectoryLock(directory, "warm-start directory") if jax.process_index() == 0
        else contextlib.nullcontext()):
    if cfg.warm_start.reuse_checkpoint and checkpoint.has_policy(directory):
      return checkpoint.load_policy(directory, abstract(), metadata,  # finished meanwhile
                                    allow_unverified=unverified), True
    params = train_base_policy(cfg, setup, writer)
    checkpoint.save_policy(directory, params, metadata)
  return params, False
