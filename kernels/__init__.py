"""Fused policy-loss kernels, installed as `copd_jax.kernels` (see setup.py).

Every op takes final hidden states and an LM head and never materialises the
[tokens x vocab] logits. One signature, three backends (`KernelConfig.backend`):
'reference' (dense jnp, the oracle), 'chunked' (XLA scan over vocabulary tiles) and
'pallas' (TPU Mosaic kernel; interpret mode on CPU).

    fused_policy_loss / sequence_policy_loss   clipped PG + OPD advantage + KL + entropy
    token_logprob_entropy                      per-token log-prob and entropy
    sampled_token_logprobs                     teacher side (optionally with top-k)
    teacher_top_k / token_stats_at_ids         top-k OPD: teacher's support, student's logits
    full_vocab_reverse_kl                      two-model KL(student || teacher)
"""
from copd_jax.kernels.config import BACKENDS, KernelConfig
from copd_jax.kernels.ops import (
    TeacherScores,
    full_vocab_reverse_kl,
    fused_policy_loss,
    sampled_token_logprobs,
    sequence_policy_loss,
    teacher_top_k,
    token_logprob_entropy,
    token_stats_at_ids,
)

__all__ = [
    "BACKENDS",
    "KernelConfig",
    "TeacherScores",
    "full_vocab_reverse_kl",
    "fused_policy_loss",
    "sampled_token_logprobs",
    "sequence_policy_loss",
    "teacher_top_k",
    "token_logprob_entropy",
    "token_stats_at_ids",
]
