"""Deviceless TPU compilation (copd_jax.analysis.tpu_compile): the roofline and memory
arithmetic by hand, and a real program compiled by the TPU compiler for a 2x2 slice.
Needs libtpu (the test extra installs jax[tpu])."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import paths
from copd_jax.config_lib import spec_of
from copd_jax import cli
from copd_jax.analysis import tpu_compile

REPO = paths.REPO
GiB = 2 ** 30


def test_chip_table_and_topology_names():
  assert tpu_compile.chip_of("v5p:4x4x12").hbm_bytes == 95 * GiB
  assert tpu_compile.chip_of("v5e:16x16").hbm_bytes == 16 * GiB
  assert tpu_compile.chip_of("v6e:8x16").peak_bf16_flops == 918e12
  assert tpu_compile.chips_in("v5p:4x4x12") == 192 and tpu_compile.chips_in("v5e:2x2") == 4
  with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
    tpu_compile.chip_of("v9:2x2")
  with pytest.raises(ValueError, match="must look like"):
    tpu_compile.chips_in("v5p")


def test_roofline_is_the_slower_of_compute_and_memory_by_hand():
  v5p = tpu_compile.CHIPS["v5p"]  # 459 TFLOP/s, 2765 GB/s
  # 918e12 FLOP = 2 s of compute; 2765e9 bytes = 1 s of HBM traffic -> compute-bound, 2 s.
  assert tpu_compile.roofline_seconds(918e12, 2765e9, v5p) == pytest.approx(2.0)
  # 459e12 FLOP = 1 s; 3 x 2765e9 bytes = 3 s -> memory-bound, 3 s.
  assert tpu_compile.roofline_seconds(459e12, 3 * 2765e9, v5p) == pytest.approx(3.0)
  v5e = tpu_compile.CHIPS["v5e"]  # 197 TFLOP/s, 819 GB/s
  assert tpu_compile.roofline_seconds(197e9, 0.0, v5e) == pytest.approx(1e-3)


def test_program_figures_count_arguments_outputs_temporaries_once_by_hand():
  v5e = tpu_compile.CHIPS["v5e"]
  memory = dict(argument_bytes=6 * GiB, output_bytes=2 * GiB, temp_bytes=3 * GiB,
                alias_bytes=1 * GiB, generated_code_bytes=10)
  cost = dict(flops=197e12, bytes_accessed=819e9 / 2)
  fig = tpu_compile.program_figures(memory, cost, v5e, compile_s=1.234, shared_bytes=2 * GiB)
  # 6 + 2 + 3 - 1 (aliased) - 2 (an argument that is another's buffer) = 8 GiB of 16.
  assert fig["per_device_bytes"] == 8 * GiB
  assert fig["hbm_bytes_per_chip"] == 16 * GiB and fig["hbm_fraction"] == 0.5
  assert fig["roofline_s"] == pytest.approx(1.0) and fig["compile_s"] == 1.23


def test_per_device_bytes_of_a_sharded_abstract_array_by_hand():
  devices = tpu_compile.tpu_devices("v5e:2x2")
  mesh = Mesh(np.asarray(devices).reshape(2, 2), ("fsdp", "tensor"))
  x = jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
  y = jax.ShapeDtypeStruct((4, 8), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, ("fsdp", "tensor"))))
  # x: a [4, 6] f32 shard = 96 bytes; y: a [4, 2] bf16 shard = 16 bytes.
  assert tpu_compile.per_device_bytes({"x": x, "y": y}) == 96 + 16


def test_a_run_program_compiles_for_a_tpu_slice_with_memory_figures():
  cfg = tpu_compile.small_config(spec_of(cli.load_config_file(os.path.join(REPO, "configs",
                                                                          "copd.py"))))
  report = tpu_compile.compile_run(cfg, "v5e:2x2", names=("teacher_scoring",))
  fig = report["teacher_scoring"]
  assert "error" not in fig, fig
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "per_device_bytes", "flops",
              "bytes_accessed", "roofline_s", "compile_s"):
    assert fig[key] > 0, (key, fig)
  assert fig["hbm_bytes_per_chip"] == 16 * GiB
  assert fig["hbm_fraction"] == pytest.approx(fig["per_device_bytes"] / (16 * GiB), abs=1e-4)
  # The arguments hold at least each device's share of the three teachers' parameters.
  run = tpu_compile.run_sharding(cfg, "v5e:2x2")
  params = tpu_compile.abstract_params(tpu_compile.run_model_config(cfg), cfg.num_experts)
  teachers = tpu_compile._with_shardings(params, run.stacked_params(params))
  assert fig["argument_bytes"] >= tpu_compile.per_device_bytes(teachers) > 0


def test_pod_configs_name_their_slice_and_carry_qwen3_vl_4b():
  for name, tpu, chips in (("pod_4b", "v5p", 192), ("pod_4b_v5e", "v5e", 256),
                           ("pod_4b_v6e", "v6e", 128)):
    cfg = cli.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))
    assert cfg.pod.tpu == tpu and cfg.pod.num_chips == chips
    assert tpu_compile.chips_in(f"{cfg.pod.tpu}:{cfg.pod.topology}") == chips
    model = tpu_compile.run_model_config(spec_of(cfg))
    assert (model.text.d_model, model.text.num_layers, model.text.vocab_size) == (2560, 36, 151936)
    assert (model.vision.depth, model.vision.hidden_size) == (24, 1024)
    assert cfg.rl.kernel.backend == "pallas" and cfg.model.attention_kernel == "auto"


def test_scanned_layer_parameters_keep_their_shardings_behind_the_layer_axis():
  from copd_jax import sharding
  from copd_jax.models import decoder, model_config
  devices = tpu_compile.tpu_devices("v5e:2x2")
  cfg = model_config.ModelConfig(vocab_size=256, d_model=64, num_layers=3, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=128, scan_layers=True)
  run = sharding.RunSharding(sharding.make_mesh(dict(expert=1, data=1, fsdp=2, tensor=2), devices),
                             param_axes=decoder.param_axes(cfg))
  params = tpu_compile.abstract_params(cfg, 2)
  specs = jax.tree.map(lambda s: s.spec, run.stacked_params(params))
  # [S, L, D, H*Dh]: the layer axis unsharded, D over fsdp, heads over tensor.
  assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == P("expert", None, "fsdp", "tensor")
  assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P("expert", None, "tensor", "fsdp")
