"""The Pallas kernels compiled by the real TPU compiler, on this CPU host (deviceless).

libtpu (the `jax[tpu]` package of the `test` extra) compiles for abstract one-chip
v5e, v5p and v6e topologies: the XLA TPU compiler and the Mosaic compiler run on every
kernel, and the Mosaic compiler enforces the scoped-VMEM limit that interpret mode (the
other kernel tests) cannot see. Nothing here is skipped: without libtpu these tests fail.

Checked: every kernel compiles at small (ragged) shapes and, with its default tiles, at the
Qwen3-4B LM-head shape (8,192 tokens per chip, D = 2,560, V = 151,936, bf16) on each
generation, and at the Qwen3-VL-8B one (D = 4,096) on v5p, the generation with the least
VMEM; the VMEM the compiler allocated stays within the kernels' limit and under the tile
model's estimate (which picks the default tiles); a tile too large fails with the
compiler's VMEM error. The file takes about 75 s of CPU (most of it the Mosaic compiler).
"""
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # tests may share the host

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from copd_jax.kernels import KernelConfig, tpu_check, tpu_tiles  # noqa: E402

ONE_CHIP = {"v5e": "v5e:1x1", "v5p": "v5p:1x1x1", "v6e": "v6e:1x1"}
LM_HEAD_KERNELS = ("token_logprob_entropy_fwd_bwd", "reverse_kl_fwd_bwd", "top_k_logprobs")
OP_OF = {"token_logprob_entropy_fwd_bwd": "token_logprob_entropy",
         "reverse_kl_fwd_bwd": "reverse_kl", "top_k_logprobs": "top_k_logprobs"}
QWEN3_4B = dict(tokens=8192, hidden=2560, vocab=151936)
QWEN3_VL_8B = dict(tokens=8192, hidden=4096, vocab=151936)
SMALL_ATTENTION = dict(heads=4, kv_heads=2, head_dim=128, seq_len=256)


def test_libtpu_is_installed():
  """The TPU compiler comes with the test extra (jax[tpu]); a missing one is a failure."""
  import libtpu  # noqa: F401 -- ImportError here: pip install -e ".[test]"
  devices = tpu_check.tpu_devices("v5p:1x1x1")
  assert len(devices) == 1 and devices[0].platform == "tpu"


def _assert_compiled(results, shape):
  for name, result in results.items():
    assert result["compiled"], f"{name} at {shape}: {result['error']}"


def _assert_vmem_within_limit_and_estimate(results, hidden):
  """The compiler's VMEM figure per kernel: <= the limit the kernel asked for, and <= the
  tile model's estimate (so the model the default tiles come from is an upper bound)."""
  for name in LM_HEAD_KERNELS:
    result = results[name]
    assert result["vmem_bytes"], f"{name}: no Pallas kernel found in the compiled program"
    assert result["max_vmem_bytes"] <= result["vmem_limit_bytes"]
    tm, tv = result["tiles"]
    estimate = tpu_tiles.kernel_vmem_bytes(tm, tv, hidden=hidden, hidden_dtype=jnp.bfloat16,
                                           head_dtype=jnp.bfloat16, op=OP_OF[name])
    for instruction, used in result["vmem_bytes"].items():
      # 'transpose_jvp_lm_head_d_hidden__.1' -> the estimate named '..._d_hidden'.
      kind = next(k for k in ("d_hidden", "d_head", "fwd", "top_k") if k in instruction)
      (estimated,) = [b for key, b in estimate.items() if kind in key]
      assert used <= estimated, (name, instruction, used, estimated)


@pytest.mark.parametrize("generation", sorted(ONE_CHIP))
def test_every_kernel_compiles_at_small_ragged_shapes(generation):
  """600 tokens, V = 1000: the last token tile and the last vocabulary tile are ragged on
  every generation (token tiles of 256 or 512, vocabulary tiles of 512); D = 192 is not a
  multiple of 128 (a full-extent block)."""
  results = tpu_check.compile_kernels(ONE_CHIP[generation], tokens=600, hidden=192, vocab=1000,
                                      top_k=4, attention_shape=SMALL_ATTENTION)
  assert set(results) == set(tpu_check.KERNELS)
  _assert_compiled(results, "small")
  # Mosaic kernels, not an interpret-mode fallback (which has no tpu_custom_call).
  _assert_vmem_within_limit_and_estimate(results, hidden=192)
  splash = results["splash_attention_fwd_bwd"]["vmem_bytes"]
  assert sorted(k.split("_segmented")[0] for k in splash) == [
      "splash_mqa_dkv", "splash_mqa_dq", "splash_mqa_fwd"], splash


@pytest.mark.parametrize("generation", sorted(ONE_CHIP))
def test_lm_head_kernels_compile_at_qwen3_4b_shape_with_default_tiles(generation):
  results = tpu_check.compile_kernels(ONE_CHIP[generation], **QWEN3_4B, kernels=LM_HEAD_KERNELS)
  _assert_compiled(results, QWEN3_4B)
  expected = tpu_tiles.PREFERRED_TOKEN_TILE[generation]
  assert results["token_logprob_entropy_fwd_bwd"]["tiles"] == [expected, 512]
  _assert_vmem_within_limit_and_estimate(results, QWEN3_4B["hidden"])


def test_every_kernel_compiles_at_qwen3_vl_8b_shape_on_v5p():
  """D = 4,096 on v5p (64 MiB of VMEM per core, the least of the three), with splash
  attention at the model's shape (32 query heads, 8 kv heads of 128, 4,096 positions)."""
  results = tpu_check.compile_kernels(ONE_CHIP["v5p"], **QWEN3_VL_8B)
  _assert_compiled(results, QWEN3_VL_8B)
  _assert_vmem_within_limit_and_estimate(results, QWEN3_VL_8B["hidden"])


def test_a_tile_too_large_for_vmem_fails_with_the_compilers_vmem_error():
  """1024 x 640 tiles need about 51 MiB in d_hidden: over v5p's 48 MiB limit, under its
  64 MiB of VMEM (past that the compiler reports another error, 'Ran out of memory in
  memory space vmem')."""
  results = tpu_check.compile_kernels(ONE_CHIP["v5p"], **QWEN3_4B, token_tile=1024,
                                      vocab_tile=640, kernels=("token_logprob_entropy_fwd_bwd",))
  result = results["token_logprob_entropy_fwd_bwd"]
  assert not result["compiled"]
  assert "CompileTimeScopedVmemOom" in result["error"], result["error"]
  assert "Scoped allocation with size" in result["error"], result["error"]


def test_default_tiles_per_generation_and_a_clear_error_past_the_budget():
  assert tpu_tiles.default_tiles("v6e", 2560).token_tile == 512
  assert tpu_tiles.default_tiles("v5p", 2560)[:2] == (256, 512)
  assert tpu_tiles.default_tiles(None, 2560) == tpu_tiles.default_tiles("v5p", 2560)
  # 3/4 of the VMEM per core: 96 MiB on v5e and v6e, 48 MiB on v5p.
  assert tpu_tiles.vmem_limit_bytes("v5p") == 48 << 20
  assert tpu_tiles.vmem_limit_bytes("v6e") == tpu_tiles.vmem_limit_bytes("v5e") == 96 << 20
  # A wider head leaves less room: the tiles shrink rather than overflow.
  wide = tpu_tiles.default_tiles("v5p", 8192, op="reverse_kl")
  assert wide.token_tile * wide.vocab_tile < 256 * 512
  with pytest.raises(ValueError, match="D=65536"):
    tpu_tiles.default_tiles("v5p", 65536)
  with pytest.raises(ValueError, match="generation"):
    tpu_tiles.default_tiles("v9", 2560)


def test_the_generation_and_platform_come_from_the_mesh_of_a_deviceless_compile():
  """Under jax.set_mesh over TPU devices the kernels target the TPU (no interpret mode,
  the generation's tiles) although this host's default backend is the CPU."""
  assert tpu_tiles.current_generation() is None and tpu_tiles.target_platform() == "cpu"
  with pytest.raises(ValueError, match="interpret"):
    KernelConfig("pallas").check_platform()
  for generation, topology in ONE_CHIP.items():
    with jax.set_mesh(Mesh(tpu_check.tpu_devices(topology), ("x",))):
      assert tpu_tiles.current_generation() == generation
      assert tpu_tiles.target_platform() == "tpu"
      tiles = tpu_tiles.resolve_tiles(None, None, hidden=2560, hidden_dtype=jnp.bfloat16,
                                      head_dtype=jnp.bfloat16, op="token_logprob_entropy")
      assert tiles == tpu_tiles.default_tiles(generation, 2560)
      assert tiles.token_tile == tpu_tiles.PREFERRED_TOKEN_TILE[generation]
      KernelConfig("pallas").check_platform()  # no error: compiling for a TPU
