"""The paper's setting on a TPU pod: CoPD with three branches (text, image, video) of
Qwen3-VL-4B, 256 prompts x 8 rollouts per branch per step, lr 1e-6, clip eps 0.2 / 0.28,
bf16 compute, the Pallas fused loss and splash attention.

Model: Qwen3-VL-4B-Instruct's architecture, from its public config.json (QWEN3_VL_4B
below, in config.pod.qwen3_vl): text decoder hidden 2560, 36 layers, 32 query / 8 kv
heads of 128, MLP 9728, vocabulary 151936, tied embeddings, interleaved MRoPE (24, 20,
20), rope theta 5e6; vision tower 24 blocks of width 1024 (16 heads, MLP 4096), 16 x 16
patches, 2 frames per temporal patch, 2 x 2 spatial merge into the decoder's 2560,
deepstack features from blocks 5, 11 and 17. Each prompt's media are padded to 2048
patches (512 vision tokens after the merge) inside its 1024 prompt tokens. A real run
must set config.init.hf_checkpoint to the checkpoint (the architecture is then read from
it) and config.data.train_files / eval_files (text, image, video) to record files: left
unset, a run stops at once with an error naming the field. The pod compile
(`python experiments/compile_tpu.py --config=configs/pod_4b.py`) needs neither: it reads
the architecture from config.pod.qwen3_vl and allocates nothing.

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
length class); RL steps carry the 192 native prompts only. configs/pod_4b_v5e.py and
configs/pod_4b_v6e.py book the same run on v5e (16 GiB per chip) and v6e (32 GiB).
"""
from __future__ import annotations

import ml_collections

from copd_jax import default_config

# Qwen3-VL-4B-Instruct config.json (the fields copd_jax reads; Qwen3VLConfig.from_hf).
QWEN3_VL_4B = dict(
    model_type="qwen3_vl", tie_word_embeddings=True, image_token_id=151655,
    video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    text_config=dict(
        vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=9728, hidden_act="silu",
        rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=True,
        rope_theta=5_000_000.0,
        rope_scaling=dict(rope_type="default", mrope_interleaved=True,
                          mrope_section=[24, 20, 20])),
    vision_config=dict(
        depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
        num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17], in_channels=3,
        patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
        hidden_act="gelu_pytorch_tanh"))

# The same decoder as config.model (the toy family's fields: used when no Qwen3-VL
# architecture applies, e.g. by the CPU-side lowering in experiments/bench_scale.py).
QWEN3_4B = dict(vocab_size=151936, d_model=2560, num_layers=36, num_heads=32,
                num_kv_heads=8, head_dim=128, mlp_dim=9728, rope_theta=5_000_000.0,
                rms_norm_eps=1e-6, tie_embeddings=True, dtype="bfloat16")


def pod_config(*, tpu: str, topology: str, num_chips: int, hbm_gib: int, mesh: dict,
               micro_batch_rows: int, workdir: str) -> ml_collections.ConfigDict:
  """The paper's CoPD run of Qwen3-VL-4B on one slice: `mesh` over its `num_chips` chips,
  gradients accumulated over micro-batches of `micro_batch_rows` rows per branch."""
  c = default_config.get("copd", "toy")
  c.workdir = workdir
  # A real run trains the checkpoint on record files: both required (the pod compile and
  # the memory figures read neither, config_lib.spec_of).
  default_config.require_paths(c, c.rl.capabilities)
  c.model.update(QWEN3_4B)
  c.pod = ml_collections.ConfigDict(dict(
      tpu=tpu, topology=topology, num_chips=num_chips, hbm_bytes_per_chip=hbm_gib * 2**30,
      qwen3_vl=QWEN3_VL_4B))
  c.mesh = ml_collections.ConfigDict(mesh)
  c.data.update(dict(max_prompt_len=1024, max_response_len=2048, vision_budget=2048))
  c.sampling.update(dict(max_new_tokens=2048, temperature=1.0))
  c.rl.update(dict(native_prompts=192, cross_prompts=64, samples_per_prompt=8,
                   learning_rate=1e-6, grad_clip_norm=1.0))
  c.rl.loss.update(dict(eps_low=0.2, eps_high=0.28))
  # The Pallas fused loss (TPU Mosaic kernels; its default tiles): the policy loss and the
  # teacher's sampled-token log-probs never build a [tokens x 151936] logits array.
  c.rl.kernel.update(dict(backend="pallas", vocab_tile=None, token_tile=None))
  # Memory: 2048 rows x 3072 tokens per branch do not fit at once. The update accumulates
  # gradients over micro-batches (teacher scoring is chunked the same way) and
  # rematerialises every decoder layer (only layer inputs are kept for the backward
  # pass). Exact: the loss is a (sum, denominator) pair.
  c.rl.micro_batch_rows = micro_batch_rows
  c.model.remat = True
  # The 36 decoder layers under one nn.scan (parameters stacked [36, ...]): the compiler
  # sees one layer, so the pod compile takes about the time of a one-layer one.
  c.model.scan_layers = True
  # Splash attention (Pallas, flash-style: no [T, T] scores) on TPU; blocks of 512
  # queries where the XLA attention runs instead.
  c.model.attention_block = 512
  c.model.attention_kernel = "auto"
  return c


def get_config(preset: str = "toy") -> ml_collections.ConfigDict:
  del preset  # one size: the pod
  # 64 rows per branch per micro-batch: 4 rows per device on the 16-way batch axis.
  return pod_config(tpu="v5p", topology="4x4x12", num_chips=192, hbm_gib=95,
                    mesh=dict(expert=3, data=1, fsdp=16, tensor=4), micro_batch_rows=64,
                    workdir="runs/pod_4b")
