"""The policy loss as plain jnp: its configuration and every per-token term (the oracle).

Everything here works on small per-token vectors (log-probs of the sampled tokens,
advantages, masks) or, for the dense KL variants, on explicit logits. The fused
kernels in `copd_jax.kernels` compute the per-token log-probs and entropies without
ever materialising logits and then call these same functions, so one definition of
each objective serves every backend. This module imports nothing of ours, so the
kernels depend on it and not on `copd_jax.rl` (whose `objectives` module keeps the
host-side GRPO group advantages).

Shapes: `N` tokens (flattened), `B` sequences of `T` positions, `V` vocabulary.

Sign convention: every `*_loss` is a quantity to *minimise*.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Log-ratios are clamped before `exp` so a stale or mismatched sampler log-prob
# cannot overflow the importance ratio to inf (the clamped region has zero gradient,
# which the PPO clip would give there anyway).
MAX_LOG_RATIO = 20.0
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_constant")
OPD_STUDENT_LOGPROBS = ("old", "current")
# How the OPD signal reaches the student: the paper's one-sample token advantage on the
# sampled token, or the reverse KL on a support the teacher sends (its top k tokens, or
# the whole vocabulary), renormalised there, as a loss term.
OPD_ESTIMATORS = ("sampled_token", "top_k", "full_vocab")


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Static settings of the policy loss (hashable, so it can be a jit static arg).

  Attributes:
    eps_low, eps_high: asymmetric PPO clip, ratio kept in [1 - eps_low, 1 + eps_high]
      (the paper uses 0.2 / 0.28).
    dual_clip: optional c > 1; for negative advantages the loss is capped at -A * c
      (dual-clip PPO), so a huge ratio cannot dominate the batch.
    kl_coef: weight of the KL-to-reference penalty on sampled tokens (0 disables it;
      reference log-probs must then not be required).
    kl_estimator: 'k1' (log-ratio), 'k2' (half squared log-ratio) or 'k3'
      (exp(-x) + x - 1, unbiased and non-negative).
    entropy_coef: weight of an entropy bonus (subtracted from the loss).
    aggregation: 'token_mean' (the paper's: sum over all tokens / number of tokens),
      'seq_mean_token_mean' (mean over sequences of each sequence's token mean) or
      'seq_sum_constant' (Dr.GRPO: sum over tokens / (sequences x constant)).
    constant_normaliser: the constant of 'seq_sum_constant' (default: T, the padded
      response length).
    opd_student_logprob: which student log-prob enters the OPD token advantage
      beta * (log p_teacher - log p_student): 'old' (the sampler's) or 'current'
      (the policy being trained, under stop-gradient). The paper does not say.
    opd_estimator: 'sampled_token' (the paper's: the OPD token advantage above),
      'top_k' (beta x reverse KL renormalised on the teacher's top `opd_top_k` tokens,
      a loss term) or 'full_vocab' (the same on the whole vocabulary).
    opd_top_k: k of the 'top_k' estimator.
    tis_cap: truncated importance sampling (0 = off). With C > 0 the policy-gradient
      term of each token is weighted by min(pi_old_trainer / pi_sampler, C), the
      trainer's old log-prob against the sampler's, and the PPO ratio is taken against
      the trainer's old log-prob; corrects for a sampler whose numerics differ from the
      trainer's (bf16 sampling, another kernel).
  """

  eps_low: float = 0.2
  eps_high: float = 0.28
  dual_clip: float | None = None
  kl_coef: float = 0.0
  kl_estimator: str = "k3"
  entropy_coef: float = 0.0
  aggregation: str = "token_mean"
  constant_normaliser: float | None = None
  opd_student_logprob: str = "old"
  opd_estimator: str = "sampled_token"
  opd_top_k: int = 16
  tis_cap: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.eps_low < 1.0:
      raise ValueError(f"PolicyLossConfig.eps_low must be in [0, 1), got {self.eps_low}")
    if not self.eps_high >= 0.0:
      raise ValueError(f"PolicyLossConfig.eps_high must be >= 0, got {self.eps_high}")
    if self.dual_clip is not None and not self.dual_clip > 1.0:
      raise ValueError(
          f"PolicyLossConfig.dual_clip must be > 1 (or None), got {self.dual_clip}")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(
          f"PolicyLossConfig.kl_estimator must be one of {KL_ESTIMATORS}, "
          f"got {self.kl_estimator!r}")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(
          f"PolicyLossConfig.aggregation must be one of {AGGREGATIONS}, "
          f"got {self.aggregation!r}")
    if self.constant_normaliser is not None and not self.constant_normaliser > 0:
      raise ValueError(
          f"PolicyLossConfig.constant_normaliser must be > 0, got {self.constant_normaliser}")
    if self.opd_student_logprob not in OPD_STUDENT_LOGPROBS:
      raise ValueError(
          "PolicyLossConfig.opd_student_logprob must be one of "
          f"{OPD_STUDENT_LOGPROBS}, got {self.opd_student_logprob!r}")
    if self.opd_estimator not in OPD_ESTIMATORS:
      raise ValueError(f"PolicyLossConfig.opd_estimator must be one of {OPD_ESTIMATORS}, "
                       f"got {self.opd_estimator!r}")
    if isinstance(self.opd_top_k, bool) or not isinstance(self.opd_top_k, int) \
        or self.opd_top_k < 1:
      raise ValueError(f"PolicyLossConfig.opd_top_k must be an int >= 1, got {self.opd_top_k!r}")
    if isinstance(self.tis_cap, bool) or not isinstance(self.tis_cap, (int, float)) \
        or not self.tis_cap >= 0:
      raise ValueError(f"PolicyLossConfig.tis_cap must be a number >= 0 (0 = off), "
                       f"got {self.tis_cap!r}")


# full_vocab sends V log-probs and V ids per token through the all-to-all and gathers V
# student logits per token: an oracle-sized estimator, for small vocabularies only.
FULL_VOCAB_MAX = 4096


def check_opd_estimator(estimator: str, top_k, backend: str, vocab_size: int | None, *,
                        one_device: bool) -> None:
  """Raise ValueError naming what is wrong with an OPD estimator setting.

  estimator: one of OPD_ESTIMATORS; top_k: its k; backend: the kernel backend;
  vocab_size: the policy's vocabulary, or None when unknown (a checkpoint's);
  one_device: whether the run uses one device (no mesh)."""
  if estimator not in OPD_ESTIMATORS:
    raise ValueError(f"estimator must be one of {OPD_ESTIMATORS}, got {estimator!r}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
  if estimator == "sampled_token":
    return
  if backend == "pallas":
    raise ValueError(f"estimator={estimator!r} needs rl.kernel.backend 'chunked' (or "
                     "'reference'): the pallas kernel has no top-k loss yet")
  if estimator == "top_k" and vocab_size is not None and top_k > vocab_size:
    raise ValueError(f"top_k={top_k} must be at most the vocabulary size {vocab_size}")
  if estimator == "full_vocab":
    if vocab_size is None or vocab_size > FULL_VOCAB_MAX:
      got = "a checkpoint's vocabulary" if vocab_size is None else f"vocab_size={vocab_size}"
      raise ValueError(f"estimator='full_vocab' is for small vocabularies (at most "
                       f"{FULL_VOCAB_MAX} tokens), got {got}; use 'top_k'")
    if not one_device:
      raise ValueError("estimator='full_vocab' is for one device (config.mesh all 1, no "
                       "pod); on a mesh use 'top_k'")


# --------------------------------------------------------------- importance ratios
def importance_ratio(logprobs, sampler_logprobs, *, truncate_at: float | None = None):
  """pi(y_t) / pi_sampler(y_t) from log-probs, optionally truncated at `truncate_at`.

  logprobs, sampler_logprobs: f32[...]. Returns f32[...]. Truncation min(r, C) has zero
  gradient above C (tokens the sampler under-sampled stop pushing).
  """
  log_ratio = jnp.clip(logprobs - sampler_logprobs, -MAX_LOG_RATIO, MAX_LOG_RATIO)
  ratio = jnp.exp(log_ratio)
  if truncate_at is not None:
    if not truncate_at > 0:
      raise ValueError(f"truncate_at must be > 0, got {truncate_at}")
    ratio = jnp.minimum(ratio, truncate_at)
  return ratio


def truncated_is_weight(old_logprobs, sampler_logprobs, cap: float):
  """Truncated importance weight min(pi_old / pi_sampler, cap), no gradient.

  For decoupled PPO, where `old_logprobs` are recomputed by the trainer and differ from
  the sampler's (sampler/trainer mismatch). The clipped surrogate is positively
  homogeneous in the advantage, so weighting a token's loss by w > 0 is the same as
  using advantage w * A: multiply the advantages by this weight before the loss.
  """
  if not cap > 0:
    raise ValueError(f"cap must be > 0, got {cap}")
  weight = importance_ratio(old_logprobs, sampler_logprobs, truncate_at=cap)
  return jax.lax.stop_gradient(weight)


class ClippedSurrogate(NamedTuple):
  """Per-token PPO terms, each f32[...] (indicators are 0/1 floats for easy means)."""

  loss: jax.Array
  ratio: jax.Array
  clipped_low: jax.Array    # A < 0 and ratio < 1 - eps_low: gradient cut by the clip
  clipped_high: jax.Array   # A > 0 and ratio > 1 + eps_high: gradient cut by the clip
  dual_clipped: jax.Array   # A < 0 and -A * ratio capped at -A * c


def ppo_clipped_surrogate(logprobs, old_logprobs, advantages, *, eps_low: float = 0.2,
                          eps_high: float = 0.28,
                          dual_clip: float | None = None) -> ClippedSurrogate:
  """PPO clipped surrogate (to minimise) with asymmetric clip and optional dual clip.

  loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), and for A < 0 with dual
  clip c: min(loss, -A c). r = pi / pi_old with pi_old the sampler's log-probs.
  All inputs f32[...] of one shape; gradients flow through `logprobs` only.
  """
  old_logprobs = jax.lax.stop_gradient(old_logprobs)
  advantages = jax.lax.stop_gradient(advantages)
  ratio = importance_ratio(logprobs, old_logprobs)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  loss = jnp.maximum(unclipped, clipped)
  dual = jnp.zeros_like(loss)
  if dual_clip is not None:
    cap = -advantages * dual_clip
    dual = ((advantages < 0) & (loss > cap)).astype(jnp.float32)
    loss = jnp.where(advantages < 0, jnp.minimum(loss, cap), loss)
  clipped_low = ((advantages < 0) & (ratio < 1.0 - eps_low)).astype(jnp.float32)
  clipped_high = ((advantages > 0) & (ratio > 1.0 + eps_high)).astype(jnp.float32)
  return ClippedSurrogate(loss, ratio, clipped_low, clipped_high, dual)


# ----------------------------------------------------------------------------- KL
def kl_penalty(logprobs, ref_logprobs, estimator: str = "k3"):
  """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi. f32[...].

  k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) + log r - 1, with
  log r = log pi(y_t) - log pi_ref(y_t). Gradients flow through `logprobs`.
  """
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
  log_ratio = logprobs - jax.lax.stop_gradient(ref_logprobs)
  if estimator == "k1":
    return log_ratio
  if estimator == "k2":
    return 0.5 * jnp.square(log_ratio)
  log_ratio = jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO)
  return jnp.exp(-log_ratio) + log_ratio - 1.0


def entropy_from_logits(logits):
  """Entropy of softmax(logits) over the last axis. logits: f[..., V] -> f32[...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # where(): 0 * log 0 is 0, and an underflowed p must not turn -inf into NaN.
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def token_logprobs_from_logits(logits, tokens):
  """log softmax(logits)[tokens]. logits: f[..., V], tokens: int[...] -> f32[...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ----------------------------------------------------------------------------- OPD
def opd_token_advantage(teacher_logprobs, student_logprobs, beta):
  """beta * (log p_teacher(y_t) - log p_student(y_t)) on the student's sampled tokens.

  A one-sample estimate of minus the reverse KL, used as a token-level advantage (the
  paper's signal). No gradient: it is an advantage, not a loss. beta: scalar or
  broadcastable f32 (0 on tokens without a teacher). Returns f32[...].
  """
  delta = teacher_logprobs - student_logprobs
  return jax.lax.stop_gradient(beta * delta)


def reverse_kl_from_logits(student_logits, teacher_logits):
  """Full-vocabulary KL(p_student || p_teacher) per position. f[..., V] x2 -> f32[...]."""
  logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  logp_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  p_s = jnp.exp(logp_s)
  return jnp.sum(jnp.where(p_s > 0, p_s * (logp_s - logp_t), 0.0), axis=-1)


def renormalised_reverse_kl(student_logprobs_k, teacher_logprobs_k):
  """KL(p_s || p_t) with both restricted to the same K tokens and renormalised there.

  student_logprobs_k, teacher_logprobs_k: f32[..., K] (log-probs, or any logits: both
  are renormalised over the K entries). Returns f32[...].
  """
  return reverse_kl_from_logits(student_logprobs_k, teacher_logprobs_k)


def topk_renormalised_reverse_kl(student_logits, teacher_logits, k: int, *,
                                 support: str = "teacher"):
  """Top-k renormalised reverse KL from dense logits (ablation oracle).

  The support is the top-k tokens of `support` ('teacher' or 'student'); both
  distributions are renormalised over it. No gradient flows into the choice of support.
  student_logits, teacher_logits: f[..., V] -> f32[...].
  """
  if support not in ("teacher", "student"):
    raise ValueError(f"support must be 'teacher' or 'student', got {support!r}")
  if not 0 < k <= student_logits.shape[-1]:
    raise ValueError(f"k must be in [1, V={student_logits.shape[-1]}], got {k}")
  chooser = teacher_logits if support == "teacher" else student_logits
  _, ids = jax.lax.top_k(jax.lax.stop_gradient(chooser), k)
  s_k = jnp.take_along_axis(student_logits, ids, axis=-1)
  t_k = jnp.take_along_axis(teacher_logits, ids, axis=-1)
  return renormalised_reverse_kl(s_k, t_k)


# ------------------------------------------------------------- the per-token loss
class PolicyTokenTerms(NamedTuple):
  """Per-token pieces of the policy loss, each f32[...] of the token shape."""

  loss: jax.Array          # pg_loss + beta * opd_kl + kl_coef * kl - entropy_coef * entropy
  pg_loss: jax.Array       # TIS-weighted when tis_cap > 0
  kl: jax.Array            # zeros when no reference log-probs are given
  entropy: jax.Array       # zeros when not given
  advantages: jax.Array    # the advantage actually used (RL + OPD), before the TIS weight
  ratio: jax.Array
  clipped_low: jax.Array
  clipped_high: jax.Array
  dual_clipped: jax.Array
  opd_kl: jax.Array        # the renormalised reverse KL of a top_k / full_vocab estimator, or 0
  tis_weight: jax.Array    # min(pi_old_trainer / pi_sampler, cap); ones when TIS is off
  tis_clipped: jax.Array   # 1 where that ratio exceeded the cap (0 when TIS is off)


def total_advantages(advantages, logprobs, old_logprobs, config: PolicyLossConfig, *,
                     teacher_logprobs=None, opd_beta=None):
  """RL advantages plus, when a teacher scored the tokens, the OPD token advantage.

  advantages, logprobs, old_logprobs, teacher_logprobs: f32[...]; opd_beta: scalar or
  f32[...] (a traced value, so a beta schedule does not recompile). Returns f32[...].
  """
  if teacher_logprobs is None:
    return advantages
  if opd_beta is None:
    raise ValueError("teacher_logprobs was given without opd_beta")
  student = old_logprobs if config.opd_student_logprob == "old" else logprobs
  return advantages + opd_token_advantage(teacher_logprobs, student, opd_beta)


def tis_weight_and_clipped(trainer_old_logprobs, sampler_logprobs, cap: float):
  """(min(w, cap), 1 where w > cap), w = exp(trainer_old - sampler); f32[...] each, no
  gradient. The weight itself is `truncated_is_weight`."""
  weight = truncated_is_weight(trainer_old_logprobs, sampler_logprobs, cap)
  raw = importance_ratio(trainer_old_logprobs, sampler_logprobs)
  return weight, jax.lax.stop_gradient((raw > cap).astype(jnp.float32))


def policy_token_terms(logprobs, old_logprobs, advantages, config: PolicyLossConfig, *,
                       entropy=None, ref_logprobs=None, teacher_logprobs=None,
                       opd_beta=None, opd_kl=None,
                       trainer_old_logprobs=None) -> PolicyTokenTerms:
  """The per-token policy loss: clipped PG on (RL + OPD) advantages, KL, entropy bonus.

  logprobs: f32[...], differentiable (the current policy on the sampled tokens);
  old_logprobs: f32[...] the sampler's; advantages: f32[...] (broadcast per token);
  entropy: f32[...] or None; ref_logprobs: f32[...] or None (required if kl_coef > 0).
  OPD, with opd_beta (scalar or f32[...], 0 on tokens without a teacher): either
  teacher_logprobs f32[...] (the sampled-token estimator, an advantage) or opd_kl
  f32[...] (a differentiable per-token KL, e.g. `renormalised_reverse_kl`, added to the
  loss as opd_beta * opd_kl).
  TIS (config.tis_cap > 0): trainer_old_logprobs f32[...] are the trainer's log-probs
  under the parameters that start this update; None takes stop_gradient(logprobs), which
  are those exactly when, as here, each batch of rollouts gets one optimizer step.
  """
  if config.kl_coef > 0 and ref_logprobs is None:
    raise ValueError("ref_logprobs is required when PolicyLossConfig.kl_coef > 0")
  if config.entropy_coef != 0 and entropy is None:
    raise ValueError("entropy is required when PolicyLossConfig.entropy_coef != 0")
  if teacher_logprobs is not None and opd_kl is not None:
    raise ValueError("give teacher_logprobs (sampled-token OPD) or opd_kl (a KL term), "
                     "not both")
  if opd_beta is not None and teacher_logprobs is None and opd_kl is None:
    raise ValueError("opd_beta was given without teacher_logprobs or opd_kl")
  if opd_kl is not None and opd_beta is None:
    raise ValueError("opd_kl was given without opd_beta")
  adv = total_advantages(advantages, logprobs, old_logprobs, config,
                         teacher_logprobs=teacher_logprobs, opd_beta=opd_beta)
  zeros = jnp.zeros_like(logprobs)
  pg_old, pg_adv = old_logprobs, adv
  tis_weight, tis_clipped = jnp.ones_like(logprobs), zeros
  if config.tis_cap > 0:
    if trainer_old_logprobs is None:
      trainer_old_logprobs = logprobs
    trainer_old_logprobs = jax.lax.stop_gradient(trainer_old_logprobs)
    tis_weight, tis_clipped = tis_weight_and_clipped(trainer_old_logprobs, old_logprobs,
                                                     config.tis_cap)
    # The clipped surrogate is positively homogeneous in A: weighting the token's PG
    # loss by w is using the advantage w * A, with the ratio against the trainer's old.
    pg_old, pg_adv = trainer_old_logprobs, adv * tis_weight
  ppo = ppo_clipped_surrogate(logprobs, pg_old, pg_adv, eps_low=config.eps_low,
                              eps_high=config.eps_high, dual_clip=config.dual_clip)
  kl = zeros if ref_logprobs is None else kl_penalty(logprobs, ref_logprobs, config.kl_estimator)
  ent = zeros if entropy is None else entropy
  loss = ppo.loss
  if opd_kl is not None:
    loss = loss + jax.lax.stop_gradient(opd_beta) * opd_kl
  if config.kl_coef > 0:
    loss = loss + config.kl_coef * kl
  if config.entropy_coef != 0:
    loss = loss - config.entropy_coef * ent
  return PolicyTokenTerms(loss, ppo.loss, kl, ent, jax.lax.stop_gradient(adv), ppo.ratio,
                          ppo.clipped_low, ppo.clipped_high, ppo.dual_clipped,
                          zeros if opd_kl is None else opd_kl, tis_weight, tis_clipped)


# ---------------------------------------------------------------------- aggregation
def aggregate_token_losses(token_losses, mask, mode: str = "token_mean", *,
                           constant_normaliser: float | None = None):
  """Reduce per-token losses to (sum, denominator); loss = sum / denominator.

  Returning the pair (not the mean) makes micro-batch accumulation exact: add the sums
  and the denominators separately, divide once.

  token_losses: f32[B, T]; mask: bool/f32[B, T] (1 = a response token that counts).
    token_mean:          (sum_bt l m, sum_bt m)
    seq_mean_token_mean: (sum_b mean_t l, number of non-empty sequences)
    seq_sum_constant:    (sum_bt l m, non-empty sequences x constant), constant
                         defaulting to T (Dr.GRPO's fixed normaliser)
  Empty sequences (all masked) count in no denominator. Returns (f32[], f32[]).
  """
  if mode not in AGGREGATIONS:
    raise ValueError(f"aggregation mode must be one of {AGGREGATIONS}, got {mode!r}")
  if token_losses.ndim != 2 or mask.shape != token_losses.shape:
    raise ValueError(
        f"token_losses and mask must both be [B, T]; got {token_losses.shape} and {mask.shape}")
  m = mask.astype(jnp.float32)
  # where(), not multiply: a NaN or inf on a padded position must not leak into the sum.
  masked = jnp.where(m > 0, token_losses * m, 0.0)
  tokens_per_seq = m.sum(axis=1)
  nonempty = (tokens_per_seq > 0).astype(jnp.float32)
  if mode == "token_mean":
    return masked.sum(), tokens_per_seq.sum()
  if mode == "seq_mean_token_mean":
    per_seq = masked.sum(axis=1) / jnp.maximum(tokens_per_seq, 1.0)
    return per_seq.sum(), nonempty.sum()
  constant = token_losses.shape[1] if constant_normaliser is None else constant_normaliser
  return masked.sum(), nonempty.sum() * constant


def mean_from_sum(loss_sum, denominator):
  """sum / denominator, and 0 (not NaN) when nothing counted."""
  return jnp.where(denominator > 0, loss_sum / jnp.maximum(denominator, 1e-30), 0.0)
