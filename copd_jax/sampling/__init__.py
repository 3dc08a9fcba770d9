"""Jitted autoregressive sampling with a KV cache, for one policy or vmapped over experts.

    rollout = generate(params, Sampler(policy, sampling_config, G), Prompts(tokens, mask, media), key)

1. Prefill: the B left-padded prompts (and their vision clips) go through the model ONCE.
   Their per-layer keys/values become the shared prefix of the cache: stored once per
   prompt and read once per prompt by all G samples (models.decoder.LayerCache), never repeated G
   times. Each of the N = B*G rows gets its own R response slots.
2. Decode: a compiled `lax.while_loop` feeds one token per step into the fixed-size cache
   (P prefix + R response slots) and stops early once every row has emitted a stop token.

Randomness: token r of every row is drawn with `fold_in(key, r)`, so a rollout is a pure
function of its key. `generate_by_recompute` follows the same key schedule without a cache
(full forward each step): it is the oracle for tests and the baseline for benchmarks.

Log-probs. Each sampled token carries two numbers, both over the FULL vocabulary (no
top-k / top-p truncation), because the trainer scores tokens under the untruncated policy:
  logprobs     = log_softmax(logits / temperature)[token]
  raw_logprobs = log_softmax(logits)[token]          (temperature 1: what the trainer
                                                      recomputes with forward_hidden)
Tokens after a row's first stop token are pad (PAD_ID) with mask 0 and log-probs 0.

Parts: tokens.py (SamplingConfig, Rollout, one token's draw), decode.py (the decode loop),
api.py (the checked entry points, and the sampler as a program on a run's mesh).
"""
from copd_jax.sampling.api import (
  Sampler,
  check_stacked_generate_args,
  generate,
  generate_by_recompute,
  sampler_program,
  stacked_generate,
)
from copd_jax.sampling.tokens import PAD_ID, Prompts, Rollout, SamplingConfig, process_logits, sample_tokens

__all__ = ["PAD_ID", "Prompts", "Rollout", "Sampler", "SamplingConfig", "check_stacked_generate_args", "generate",
           "generate_by_recompute", "process_logits", "sample_tokens", "sampler_program",
           "stacked_generate"]
