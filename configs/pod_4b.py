"""The paper's setting on a TPU pod: CoPD with three branches (text, image, video) of a
Qwen3-VL-4B-sized policy, 256 prompts x 8 rollouts per branch per step, lr 1e-6, clip
eps 0.2 / 0.28, bf16 compute.

Language model: Qwen3-4B text dimensions (vocab 151936, d_model 2560, 36 layers, 32 query
heads, 8 kv heads, head_dim 128, MLP 9728, tied embeddings, rope_theta 5e6). Vision: our
small ViT stand-in (copd_jax/models/toy_vision.py), not Qwen3-VL's 0.4B tower, so the vision tower
contributes ~0.1M parameters instead of ~0.4B; everything else is 4B-sized.

Slice: TPU v5p 4x4x12 (192 chips, accelerator type v5p-384), three full 4x4x4 cubes. The
chip count is a multiple of 3 so each branch owns one cube: `expert`=3 maps onto the
multi-cube dimension, and each branch runs FSDP=16 x tensor=4 inside its own cube, where
the ICI links are densest. Only rollout tokens and per-token log-probs cross cubes.
(Cloud TPU documents multi-cube v5p/v4 shapes as AxBxC with every dimension a multiple of
4, e.g. v4's 4x4x12 = v4-384; v5p's table lists the common shapes and says it is not
exhaustive. If 4x4x12 is not offered, use three v5p-128 slices via multislice with the
expert axis over DCN: the same mesh, expert traffic is small.)

Rows per step per branch on an OPD step: (192 native + 64 cross prompts) x 8 samples =
2048 rows of 1024 prompt + 2048 response tokens (math-reasoning responses of the paper's
length class); RL steps carry the 192 native prompts only.

Validation here: `python -m experiments.bench_scale` (or `parallel.abstract_opd_update`) lowers and
compiles the OPD update with abstract shapes on simulated CPU devices; nothing is
allocated. config_lib.validate_mesh checks config.mesh against config.pod.num_chips (the
slice), not against this machine's devices.
"""
from __future__ import annotations

import ml_collections

from copd_jax import default_config

QWEN3_4B = dict(vocab_size=151936, d_model=2560, num_layers=36, num_heads=32,
                num_kv_heads=8, head_dim=128, mlp_dim=9728, rope_theta=5_000_000.0,
                rms_norm_eps=1e-6, tie_embeddings=True, dtype="bfloat16")


def get_config(preset: str = "toy") -> ml_collections.ConfigDict:
  del preset  # one size: the pod
  c = default_config.get("copd", "toy")
  c.workdir = "runs/pod_4b"
  c.model.update(QWEN3_4B)
  c.pod = ml_collections.ConfigDict(dict(
      tpu="v5p", topology="4x4x12", num_chips=192, hbm_bytes_per_chip=95 * 2**30))
  c.mesh = ml_collections.ConfigDict(dict(expert=3, data=1, fsdp=16, tensor=4))
  c.data.update(dict(max_prompt_len=1024, max_response_len=2048))
  c.sampling.update(dict(max_new_tokens=2048, temperature=1.0))
  c.rl.update(dict(native_prompts=192, cross_prompts=64, samples_per_prompt=8,
                   learning_rate=1e-6, grad_clip_norm=1.0))
  c.rl.loss.update(dict(eps_low=0.2, eps_high=0.28))
  # Big vocabulary: 2048-wide vocab tiles and 4096-token tiles keep the fused loss's live
  # [tokens x vocab_tile] block small (never [tokens x 151936]).
  c.rl.kernel.update(dict(backend="chunked", vocab_tile=2048, token_tile=4096))
  # Memory: 2048 rows x 3072 tokens per branch do not fit at once. The update accumulates
  # gradients over micro-batches of 64 rows per branch (4 rows per device on the 16-way
  # batch axis; teacher scoring is chunked the same way) and rematerialises every decoder
  # layer (only layer inputs are kept for the backward pass). Exact: the loss is a
  # (sum, denominator) pair.
  c.rl.micro_batch_rows = 64
  c.model.remat = True
  # Attention in blocks of 512 queries (model.in_query_blocks): a layer's live scores are
  # [rows, heads, 512, keys], never [rows, heads, 3072, 3072].
  c.model.attention_block = 512
  c.model.attention_kernel = "auto"  # Pallas splash attention on TPU, blocked XLA elsewhere
  return c
