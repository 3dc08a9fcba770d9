"""Public fused LM-head ops: one signature, three backends chosen by `KernelConfig`.

Never materialising logits: the ops take final hidden states and the LM head and
return per-token quantities (log-prob of the sampled token, entropy, KL). The policy
loss is then a function of those [N] vectors only (copd_jax.losses), so its
gradient reaches the tiled backward pass as one coefficient per token, and every
backend shares the same objective code.

Conventions: hidden: float[..., D] (final-normed, f32 or bf16; matmuls run in its
dtype with f32 accumulation), head: float[D, V] (for tied embeddings pass
embedding.T), tokens: int[...]. Temperature: pass hidden / temperature.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from copd_jax import losses
from copd_jax.kernels import chunked, pallas_tpu, reference, sharded
from copd_jax.kernels.config import KernelConfig, check_lm_head_inputs, check_per_token
from copd_jax.losses import PolicyLossConfig

DEFAULT_KERNEL = KernelConfig()
DEFAULT_POLICY_LOSS = PolicyLossConfig()


def _flatten_tokens(hidden, tokens, prefix=""):
  """hidden [..., D], tokens [...] -> ([N, D], [N], leading shape)."""
  if hidden.ndim < 1 or (tokens is not None and tokens.shape != hidden.shape[:-1]):
    raise ValueError(
        f"{prefix}tokens shape {None if tokens is None else tokens.shape} must equal "
        f"{prefix}hidden's leading shape {hidden.shape[:-1]}")
  lead = hidden.shape[:-1]
  flat_tokens = None if tokens is None else tokens.reshape(-1)
  return hidden.reshape(-1, hidden.shape[-1]), flat_tokens, lead


def _check_kernel(kernel):
  if not isinstance(kernel, KernelConfig):
    raise ValueError(f"kernel must be a KernelConfig, got {type(kernel).__name__}")
  kernel.check_platform()


# ------------------------------------------------------------ per-token statistics
def token_logprob_entropy(hidden, head, tokens, *, kernel: KernelConfig = DEFAULT_KERNEL):
  """Log-prob of each sampled token and the entropy of each position's distribution.

  hidden: float[..., D]; head: float[D, V]; tokens: int[...] in [0, V).
  Returns (logprobs f32[...], entropy f32[...]); differentiable w.r.t. hidden and head
  (custom VJP with tile recomputation for chunked and pallas).
  """
  _check_kernel(kernel)
  flat_hidden, flat_tokens, lead = _flatten_tokens(hidden, tokens)
  check_lm_head_inputs(flat_hidden, head, flat_tokens)
  if kernel.backend == "reference":
    logprobs, entropy = reference.token_logprob_entropy(flat_hidden, head, flat_tokens)
  elif kernel.backend == "chunked":
    logprobs, entropy = chunked.token_logprob_entropy(
        flat_hidden, head, flat_tokens, kernel.tokens_per_tile, kernel.columns_per_tile)
  else:
    # On a multi-device mesh, per device on its rows and its share of the vocabulary
    # (kernels/sharded.py).
    logprobs, entropy = sharded.vocab_parallel_stats(
        lambda h, t, w: pallas_tpu.token_logprob_entropy(
            h, w, t, kernel.tokens_per_tile, kernel.columns_per_tile, kernel.interpret),
        flat_hidden, flat_tokens, head)
  return logprobs.reshape(lead), entropy.reshape(lead)


def token_stats_at_ids(hidden, head, tokens, ids, *, kernel: KernelConfig = DEFAULT_KERNEL):
  """`token_logprob_entropy` plus the raw logits at given token ids, in the same pass.

  hidden: float[..., D]; head: float[D, V]; tokens: int[...]; ids: int[..., k] in [0, V),
  distinct along the last axis (e.g. a teacher's top k). Returns (logprobs f32[...],
  entropy f32[...], logits f32[..., k]); differentiable w.r.t. hidden and head. For the
  top-k OPD loss, which renormalises the student on the teacher's support. Backends
  'reference' and 'chunked' ('pallas' raises NotImplementedError).
  """
  _check_kernel(kernel)
  flat_hidden, flat_tokens, lead = _flatten_tokens(hidden, tokens)
  check_lm_head_inputs(flat_hidden, head, flat_tokens)
  if ids.shape[:-1] != tokens.shape or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids must be int[{', '.join(map(str, tokens.shape))}, k] (the tokens' "
                     f"shape plus k), got {ids.dtype}{list(ids.shape)}")
  k = ids.shape[-1]
  flat_ids = ids.reshape(-1, k)
  if kernel.backend == "reference":
    out = reference.token_stats_at_ids(flat_hidden, head, flat_tokens, flat_ids)
  elif kernel.backend == "chunked":
    out = chunked.token_stats_at_ids(flat_hidden, head, flat_tokens, flat_ids,
                                     kernel.tokens_per_tile, kernel.columns_per_tile)
  else:
    raise NotImplementedError(
        "token_stats_at_ids (the top_k / full_vocab OPD estimators) has no pallas kernel; "
        "use KernelConfig.backend='chunked' (or 'reference')")
  logprobs, entropy, at_ids = out
  return logprobs.reshape(lead), entropy.reshape(lead), at_ids.reshape(*lead, k)


def teacher_top_k(hidden, head, k: int, *, kernel: KernelConfig = DEFAULT_KERNEL):
  """The teacher's k most likely tokens at each position, one pass, no logits, no gradient.

  hidden: float[..., D]; head: float[D, V]. Returns (log-probs f32[..., k], ids
  int32[..., k]), largest first: what a teacher sends for the top-k OPD loss.
  """
  _check_kernel(kernel)
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= head.shape[-1]:
    raise ValueError(f"k must be an int in [1, V={head.shape[-1]}], got {k!r}")
  flat_hidden, _, lead = _flatten_tokens(hidden, None)
  check_lm_head_inputs(flat_hidden, head)
  flat_hidden, head = jax.lax.stop_gradient((flat_hidden, head))
  if kernel.backend == "reference":
    values, ids = reference.top_k_logprobs(flat_hidden, head, k)
  elif kernel.backend == "chunked":
    values, ids = chunked.top_k_logprobs(flat_hidden, head, k, kernel.tokens_per_tile,
                                         kernel.columns_per_tile)
  else:
    values, ids = sharded.rows_over_mesh(
        lambda h, w: pallas_tpu.top_k_logprobs(h, w, k, kernel.tokens_per_tile,
                                               kernel.columns_per_tile, kernel.interpret),
        (flat_hidden,), (head,))
  return values.reshape(*lead, k), ids.reshape(*lead, k)


class TeacherScores(NamedTuple):
  """logprobs: f32[...] on the sampled tokens; top_k_logprobs: f32[..., k] and
  top_k_ids: int32[..., k], the teacher's k most likely tokens (largest first)."""

  logprobs: jax.Array
  top_k_logprobs: jax.Array
  top_k_ids: jax.Array


def sampled_token_logprobs(hidden, head, tokens, *, kernel: KernelConfig = DEFAULT_KERNEL,
                           top_k: int | None = None):
  """Teacher side: log p(tokens) from a teacher's hidden states and head, no logits.

  hidden: float[..., D]; head: float[D, V]; tokens: int[...].
  Returns f32[...], or TeacherScores when top_k is given (the top-k part has no
  gradient; it is for top-k KL ablations and the overlap diagnostic). The pallas
  backend selects the top k by k rounds of max-selection per tile (cost grows with k).
  """
  if top_k is None:
    return token_logprob_entropy(hidden, head, tokens, kernel=kernel)[0]
  _check_kernel(kernel)
  if not isinstance(top_k, int) or top_k < 1 or top_k > head.shape[-1]:
    raise ValueError(f"top_k must be an int in [1, V={head.shape[-1]}], got {top_k!r}")
  logprobs = token_logprob_entropy(hidden, head, tokens, kernel=kernel)[0]
  flat_hidden, _, lead = _flatten_tokens(hidden, tokens)
  flat_hidden, head = jax.lax.stop_gradient((flat_hidden, head))
  if kernel.backend == "reference":
    values, ids = reference.top_k_logprobs(flat_hidden, head, top_k)
  elif kernel.backend == "chunked":
    values, ids = chunked.top_k_logprobs(flat_hidden, head, top_k,
                                         kernel.tokens_per_tile, kernel.columns_per_tile)
  else:
    values, ids = sharded.rows_over_mesh(
        lambda h, w: pallas_tpu.top_k_logprobs(h, w, top_k, kernel.tokens_per_tile,
                                               kernel.columns_per_tile, kernel.interpret),
        (flat_hidden,), (head,))
  return TeacherScores(logprobs, values.reshape(*lead, top_k), ids.reshape(*lead, top_k))


def full_vocab_reverse_kl(student_hidden, student_head, teacher_hidden, teacher_head, *,
                          kernel: KernelConfig = DEFAULT_KERNEL):
  """Per-token full-vocabulary KL(p_student || p_teacher), never materialising logits.

  student_hidden: float[..., Ds], student_head: float[Ds, V], teacher_hidden:
  float[..., Dt], teacher_head: float[Dt, V]. Returns f32[...]. The teacher is held
  constant (stop-gradient): gradients reach the student's hidden states and head only.
  """
  _check_kernel(kernel)
  s_hidden, _, lead = _flatten_tokens(student_hidden, None)
  t_hidden, _, t_lead = _flatten_tokens(teacher_hidden, None)
  if t_lead != lead:
    raise ValueError(
        f"teacher_hidden leading shape {t_lead} must equal student_hidden's {lead}")
  check_lm_head_inputs(s_hidden, student_head, prefix="student_")
  check_lm_head_inputs(t_hidden, teacher_head, prefix="teacher_")
  if student_head.shape[1] != teacher_head.shape[1]:
    raise ValueError(f"student_head vocab {student_head.shape[1]} != teacher_head vocab "
                     f"{teacher_head.shape[1]}")
  t_hidden, teacher_head = jax.lax.stop_gradient((t_hidden, teacher_head))
  if kernel.backend == "reference":
    kl = reference.reverse_kl(s_hidden, student_head, t_hidden, teacher_head)
  elif kernel.backend == "chunked":
    kl = chunked.reverse_kl(s_hidden, student_head, t_hidden, teacher_head,
                            kernel.tokens_per_tile, kernel.columns_per_tile)
  else:
    kl = sharded.rows_over_mesh(
        lambda sh, th, sw, tw: pallas_tpu.reverse_kl(sh, sw, th, tw, kernel.tokens_per_tile,
                                                     kernel.columns_per_tile,
                                                     kernel.interpret),
        (s_hidden, t_hidden), (student_head, teacher_head))
  return kl.reshape(lead)


# ------------------------------------------------------------------ policy loss
def _policy_aux(terms: losses.PolicyTokenTerms, logprobs) -> dict[str, Any]:
  aux = {name: jax.lax.stop_gradient(value) for name, value in terms._asdict().items()}
  aux["logprobs"] = jax.lax.stop_gradient(logprobs)
  aux["token_loss"] = aux.pop("loss")
  return aux


def _policy_terms(hidden, head, tokens, advantages, old_logprobs, mask, ref_logprobs,
                  teacher_logprobs, opd_beta, config, kernel, teacher_support=None):
  """Token shape S = tokens.shape. Returns (PolicyTokenTerms of f32[S], logprobs f32[S])."""
  if not isinstance(config, PolicyLossConfig):
    raise ValueError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
  shape = tokens.shape
  for name, value in (("old_logprobs", old_logprobs), ("mask", mask),
                      ("ref_logprobs", ref_logprobs), ("teacher_logprobs", teacher_logprobs)):
    if value is not None and jnp.shape(value) != shape:
      raise ValueError(f"{name} must have the tokens' shape {shape}, got {jnp.shape(value)}")
  if opd_beta is not None and jnp.ndim(opd_beta) and jnp.shape(opd_beta) != shape:
    raise ValueError(f"opd_beta must be a scalar or of the tokens' shape {shape}, "
                     f"got {jnp.shape(opd_beta)}")
  if mask is None:
    raise ValueError("mask is required: bool/f32 of the tokens' shape, 1 = counts")
# Padding positions may hold any id (e.g. -1): send them to id 0 so no backend reads
# outside the vocabulary. Their loss is masked out below.
  tokens = jnp.where(mask.astype(bool), tokens, 0)
  opd_kl = None
  if teacher_support is None:
    logprobs, entropy = token_logprob_entropy(hidden, head, tokens, kernel=kernel)
  else:
    support_logprobs, support_ids = teacher_support
    if support_ids.shape != support_logprobs.shape or support_ids.shape[:-1] != shape:
      raise ValueError(f"teacher_support must be (log-probs, ids) of the tokens' shape {shape} "
                       f"plus k, got {support_logprobs.shape} and {support_ids.shape}")
    logprobs, entropy, student_logits = token_stats_at_ids(hidden, head, tokens, support_ids,
                                                           kernel=kernel)
    opd_kl = losses.renormalised_reverse_kl(student_logits,
                                            jax.lax.stop_gradient(support_logprobs))
  terms = losses.policy_token_terms(
      logprobs, old_logprobs.astype(jnp.float32), advantages.astype(jnp.float32), config,
      entropy=entropy, ref_logprobs=ref_logprobs, teacher_logprobs=teacher_logprobs,
      opd_beta=opd_beta, opd_kl=opd_kl)
  return terms, logprobs


def fused_policy_loss(hidden, head, tokens, advantages, old_logprobs, mask, *,
                      ref_logprobs=None, teacher_logprobs=None, opd_beta=None,
                      teacher_support=None,
                      config: PolicyLossConfig = DEFAULT_POLICY_LOSS,
                      kernel: KernelConfig = DEFAULT_KERNEL):
  """LM head + log-softmax + clipped PG (+ OPD advantage) + KL + entropy, token-mean.

  hidden: float[N, D]; head: float[D, V]; tokens: int[N]; advantages: f32[N] (RL
  advantages, per token); old_logprobs: f32[N] (the sampler's); mask: bool/f32[N];
  ref_logprobs: f32[N] or None (needed when config.kl_coef > 0); teacher_logprobs:
  f32[N] or None, with opd_beta (scalar or f32[N], 0 where no teacher) adding
  beta * (teacher - student) to the advantage; or instead teacher_support, a pair
  (log-probs f32[N, k], ids int32[N, k]) the teacher sent (`teacher_top_k`), adding
  beta * KL(student || teacher) renormalised on those k tokens to the loss (opd_kl).

  Returns (loss_sum f32[], denominator f32[], aux): loss = loss_sum / denominator;
  sums over micro-batches accumulate exactly. aux holds per-token f32[N] arrays:
  token_loss, pg_loss, logprobs, entropy, kl, advantages (RL + OPD), ratio,
  clipped_low, clipped_high, dual_clipped, opd_kl, tis_weight, tis_clipped. Only config.aggregation == 'token_mean'
  is defined on flat tokens; use `sequence_policy_loss` for per-sequence modes.
  """
  if config.aggregation != "token_mean":
    raise ValueError(
        f"config.aggregation={config.aggregation!r} needs sequences; call "
        "sequence_policy_loss with [B, T] inputs (fused_policy_loss is token_mean only)")
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be [N] for fused_policy_loss, got shape {tokens.shape}")
  check_lm_head_inputs(hidden, head, tokens)
  check_per_token("advantages", advantages, tokens.shape[0])
  terms, logprobs = _policy_terms(hidden, head, tokens, advantages, old_logprobs, mask,
                                  ref_logprobs, teacher_logprobs, opd_beta, config, kernel,
                                  teacher_support)
  loss_sum, denominator = losses.aggregate_token_losses(
      terms.loss[None], mask[None], "token_mean")
  return loss_sum, denominator, _policy_aux(terms, logprobs)


def sequence_policy_loss(hidden, head, tokens, advantages, old_logprobs, mask, *,
                         ref_logprobs=None, teacher_logprobs=None, opd_beta=None,
                         teacher_support=None,
                         config: PolicyLossConfig = DEFAULT_POLICY_LOSS,
                         kernel: KernelConfig = DEFAULT_KERNEL):
  """`fused_policy_loss` on sequences, with config.aggregation applied.

  hidden: float[B, T, D]; tokens, old_logprobs, mask (and ref/teacher log-probs,
  opd_beta if not scalar): [B, T]; teacher_support: ([B, T, k], [B, T, k]);
  advantages: f32[B] (one per sequence, as GRPO
  gives) or f32[B, T]. Returns (loss_sum, denominator, aux of [B, T] arrays); see
  losses.aggregate_token_losses for each mode's pair.
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T] for sequence_policy_loss, got {tokens.shape}")
  _flatten_tokens(hidden, tokens)  # tokens must match hidden's [B, T]
  if advantages.shape == tokens.shape[:1]:
    advantages = jnp.broadcast_to(advantages[:, None], tokens.shape)
  elif advantages.shape != tokens.shape:
    raise ValueError(f"advantages must be [B]={tokens.shape[:1]} or [B, T]={tokens.shape}, "
                     f"got {advantages.shape}")
  terms, logprobs = _policy_terms(hidden, head, tokens, advantages, old_logprobs, mask,
                                  ref_logprobs, teacher_logprobs, opd_beta, config, kernel,
                                  teacher_support)
  loss_sum, denominator = losses.aggregate_token_losses(
      terms.loss, mask, config.aggregation, constant_normaliser=config.constant_normaliser)
  return loss_sum, denominator, _policy_aux(terms, logprobs)
