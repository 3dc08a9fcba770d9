"""The update's typed batch (Rows), its configuration (UpdateConfig) and row / column helpers
(a rollout as teacher-forcing rows: rollout_to_sequences, align_response_values)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax import kernels, losses, sampling
from copd_jax.models import decoder, model_config
from copd_jax.models.policy import Policy, policy_of


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """Static settings of the jitted update (hashable)."""
  # The policy model: a models.policy Policy, or its model config (a ModelConfig or a
  # Qwen3VLConfig, whose rows' frames are PromptMedia); the scorers use `policy`.
  model: model_config.ModelConfig
  loss: losses.PolicyLossConfig
  kernel: kernels.KernelConfig
  scale_by_std: bool = True  # GRPO (True) or Dr.GRPO (False) group advantages
  # Rows per micro-batch of the update (gradient accumulation) and of teacher / reference
  # scoring; 0 = all rows at once. Exact: losses are (sum, denominator) pairs.
  micro_batch_rows: int = 0
  # G: rows b*G .. b*G+G-1 share prompt b (as build_rows lays them out). With a known
  # prompt length the update runs each prompt once for its G rows (see _response_hidden).
  samples_per_prompt: int = 1

  def __post_init__(self):
    for name in ("micro_batch_rows", "samples_per_prompt"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"UpdateConfig.{name} must be an integer >= 0, got {value!r}")
    if self.samples_per_prompt < 1:
      raise ValueError("UpdateConfig.samples_per_prompt must be >= 1, got 0")
    if self.micro_batch_rows % self.samples_per_prompt:
      raise ValueError(
          f"UpdateConfig.micro_batch_rows ({self.micro_batch_rows}) must be a multiple of "
          f"samples_per_prompt ({self.samples_per_prompt}): a micro-batch holds whole prompts")
    policy_of(self.model)  # a clear error now for what is not a model

  @property
  def policy(self) -> Policy:
    """The models.policy Policy that scores the rows."""
    return policy_of(self.model)

  def with_constraint(self, constrain) -> "UpdateConfig":
    """These settings with the policy's residual stream constrained by constrain(x)
    (decoder.Decoder.constrain; RunSharding.constrain_rows while the update is traced)."""
    return dataclasses.replace(self, model=self.policy.with_constraint(constrain))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
  """Scored-rollout rows of every student: prompt + response, ready for teacher forcing.

  Leading axes [S, R] (R = rows per student). T = P + max_new_tokens.
  tokens, positions: int32[S, R, T]; token_mask: bool[S, R, T];
  response_mask: f32[S, R, T] (1 at t when token t+1 is a response token);
  old_logprobs: f32[S, R, T] (the sampler's, aligned like response_mask);
  advantages: f32[S, R] (RL advantage of the row); opd_beta: f32[S, R] (beta of the
  row's teacher, 0 for native rows); frames: the row's prompt media -- f32[S, R, F, H, W, C]
  for the toy model, a qwen3_vl_decode.PromptMedia with leading [S, R] for Qwen3-VL (its
  positions come from there), or None.
  prompt_len (static: part of the pytree's structure, as jit's cache key): the prompt
  columns P of every row (rollout.build_rows sets it), or 0 = unknown. With P > 0 every
  prompt runs once for its UpdateConfig.samples_per_prompt rows and only the response
  columns go through the LM head and the loss (loss_columns): the same loss as P = 0,
  for a fraction of the work.
  """
  tokens: jax.Array
  positions: jax.Array
  token_mask: jax.Array
  response_mask: jax.Array
  old_logprobs: jax.Array
  advantages: jax.Array
  opd_beta: jax.Array
  frames: jax.Array
  prompt_len: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def inputs(self) -> "RowInputs":
    """What a model reads of these rows."""
    return RowInputs(self.tokens, self.positions, self.token_mask, self.frames)


class RowInputs(NamedTuple):
  """What a model reads of teacher-forcing rows (or of their prompts): tokens,
  positions int32[N, T]; token_mask bool[N, T]; frames: the rows' media [N, ...] (the
  toy's frames or Qwen3-VL's PromptMedia) or None. Leading axes before N are allowed (a
  vmap or a micro-batch split maps over them)."""
  tokens: Any
  positions: Any
  token_mask: Any
  frames: Any


def rollout_to_sequences(prompt_tokens, prompt_mask, rollout: sampling.Rollout):
  """Prompt + response as teacher-forcing input for forward_hidden.

  prompt_tokens: int32[B, P] (left-padded); prompt_mask: bool[B, P]; rollout: [B, G, R].
  Returns, with N = B*G rows ordered (prompt b, sample j) -> b*G + j and T = P + R:
    tokens:        int32[N, T]  prompt then response (pad after the stop token)
    positions:     int32[N, T]  cumsum(token_mask) - 1, as the sampler used
    token_mask:    bool[N, T]   prompt tokens and valid response tokens
    response_mask: f32[N, T]    1 at t when token t+1 is a valid response token

  Off-by-one convention: hidden[:, t] predicts tokens[:, t+1]. So response token r (at
  column P+r) is scored by the hidden at column P-1+r, and response_mask[:, P-1+r] =
  rollout.mask[:, r]; the last column is always 0. `next_token_targets(tokens)` gives the
  matching targets and `align_response_values` puts per-token rollout values (e.g.
  raw_logprobs) in the same columns. Vision inputs must be repeated G times
  (`jnp.repeat(vision, G, axis=0)`). For a stacked rollout, jax.vmap this function.
  """
  b, g, r = rollout.tokens.shape
  n = b * g
  tokens = jnp.concatenate([jnp.repeat(prompt_tokens, g, axis=0).astype(jnp.int32),
                            rollout.tokens.reshape(n, r)], axis=1)
  token_mask = jnp.concatenate([jnp.repeat(prompt_mask.astype(bool), g, axis=0),
                                rollout.mask.reshape(n, r) > 0], axis=1)
  positions = decoder.positions_from_mask(token_mask)
  response_mask = align_response_values(rollout.mask, prompt_tokens.shape[1])
  return tokens, positions, token_mask, response_mask


def next_token_targets(tokens):
  """int32[N, T] -> int32[N, T]: targets[:, t] = tokens[:, t+1], last column sampling.PAD_ID."""
  return jnp.concatenate([tokens[:, 1:], jnp.full_like(tokens[:, :1], sampling.PAD_ID)], axis=1)


def align_response_values(values, prompt_length: int):
  """Per-response-token values [B, G, R] -> f32[B*G, P+R], value r at column P-1+r (the
  column whose hidden state predicts response token r), zeros elsewhere."""
  b, g, r = values.shape
  flat = values.reshape(b * g, r).astype(jnp.float32)
  return jnp.pad(flat, ((0, 0), (prompt_length - 1, 1)))


def split_rows(x, size: int, group: int = 1):
  """x: [N, ...] -> [n, size, ...] micro-batches, n = ceil(N / size), rows past N zero.

  Micro-batch i holds rows i, i + n, i + 2n, ... (strided, not contiguous): an array whose
  row axis is block-sharded over devices stays spread over the same devices inside every
  micro-batch, instead of one micro-batch per device group. With group = G > 1 the unit is
  a prompt's G consecutive rows (size must be a multiple of G): groups are strided, the
  rows of a group stay together and in order."""
  if size % group or x.shape[0] % group:
    raise ValueError(f"split_rows: rows ({x.shape[0]}) and micro-batch size ({size}) must be "
                     f"multiples of the group size {group}")
  x = x.reshape((x.shape[0] // group, group) + x.shape[1:])
  per = size // group
  n = -(-x.shape[0] // per)
  pad = n * per - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  x = jnp.swapaxes(x.reshape((per, n) + x.shape[1:]), 0, 1)  # [n, per, G, ...]
  return x.reshape((n, size) + x.shape[3:])


def join_rows(x, count: int, group: int = 1):
  """The inverse of split_rows: [n, size, ...] -> [count, ...]."""
  n, size = x.shape[:2]
  x = jnp.swapaxes(x.reshape((n, size // group, group) + x.shape[2:]), 0, 1)
  return x.reshape((-1,) + x.shape[3:])[:count]


def map_row_micro_batches(fn: Callable, micro_batch_rows: int, *arrays, group: int = 1):
  """fn over micro-batches of rows (jax.lax.map: one micro-batch live at a time), results
  joined back. arrays: [N, ...] (None allowed); fn(*arrays) returns [rows, ...]. With
  micro_batch_rows 0 or >= N, fn runs once on all rows. group: see split_rows."""
  count = jax.tree_util.tree_leaves(arrays)[0].shape[0]
  if not micro_batch_rows or micro_batch_rows >= count:
    return fn(*arrays)
  chunks = jax.tree.map(lambda x: split_rows(x, micro_batch_rows, group), arrays)
  out = jax.lax.map(lambda chunk: fn(*chunk), chunks)
  return jax.tree.map(lambda x: join_rows(x, count, group), out)


def loss_columns(x, prompt_len: int):
  """The columns of a column-aligned row array [N, T, ...] that the loss reads: with a
  known prompt length P, the R = T - P columns P-1 .. T-2 whose hidden states predict the
  response tokens (the prompt columns carry no loss); with P = 0 (unknown) all T."""
  return x[:, prompt_len - 1:-1] if prompt_len else x


def loss_targets(tokens, prompt_len: int):
  """int32[N, W]: the token each loss column predicts (see loss_columns)."""
  return tokens[:, prompt_len:] if prompt_len else next_token_targets(tokens)


def first_of_groups(x, group: int):
  """[B*G, ...] -> [B, ...]: the first row of every group of G consecutive rows. A reshape
  and an index, not a strided slice x[::G]: on a mesh whose devices hold blocks of rows the
  partitioner keeps this local (a strided slice made it move rows between devices)."""
  return x.reshape((x.shape[0] // group, group) + x.shape[1:])[:, 0]


def update_config(cfg, model_cfg) -> UpdateConfig:
  """The UpdateConfig of a RunSpec and its built ModelConfig: the one place the update's
  settings are read from the run's settings."""
  rl = cfg.rl
  loss = {f.name: getattr(rl.loss, f.name) for f in dataclasses.fields(rl.loss)}
  if loss["aggregation"] == "seq_sum_constant" and loss.get("constant_normaliser") is None:
    # Dr.GRPO's constant is the padded *response* length (rows also hold the prompt).
    loss["constant_normaliser"] = float(cfg.sampling.max_new_tokens)
  # The OPD estimator lives in rl.opd (what teachers send) but shapes the loss.
  loss["opd_estimator"] = rl.opd.estimator
  loss["opd_top_k"] = int(rl.opd.top_k)
  return UpdateConfig(model=model_cfg, loss=losses.PolicyLossConfig(**loss),
                      kernel=rl.kernel, scale_by_std=rl.scale_by_std,
                      micro_batch_rows=rl.micro_batch_rows,
                      samples_per_prompt=rl.samples_per_prompt)
