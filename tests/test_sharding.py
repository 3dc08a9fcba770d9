"""Mesh, logical-axis shardings, the sharded update == the unsharded one, and the HLO check
that nothing parameter-sized crosses the `expert` mesh axis in an OPD step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import pod_4b
from copd_jax.config_lib import spec_of
from copd_jax import config_lib, kernels, losses, sharding
from copd_jax.analysis import abstract_step, hlo_audit
from copd_jax.models import decoder, stacked as experts
from copd_jax.models.model_config import ModelConfig
from copd_jax.rl import rows as trainer, scoring, stages, update as update_lib
from tests.tiny_model import one_device_run, tiny_config, update_traces

SMALL_VISION = dict(image_size=8, patch_size=8, num_frames=2, tubelet=2, width=16, depth=1,
                    num_heads=2, mlp_dim=32)


def test_run_shardings_are_equal_by_value_so_runs_share_programs():
  # Each run builds its own RunSharding; it is a static argument of every program, so
  # equal settings must compare (and hash) equal or every run would retrace.
  axes = {("w",): ("embed", "mlp"), ("b",): ("mlp",)}
  a = sharding.RunSharding.one_device(param_axes=axes)
  b = sharding.RunSharding.one_device(param_axes=dict(reversed(list(axes.items()))))
  assert a == b and hash(a) == hash(b)
  assert a != sharding.RunSharding.one_device(param_axes={**axes, ("w",): ("mlp", "embed")})
  assert a != sharding.RunSharding.one_device()  # rows only: no parameter axes
  assert a != sharding.RunSharding(sharding.make_mesh(dict(expert=2, data=1, fsdp=2, tensor=2)),
                                   param_axes=axes)
  assert a != dataclasses.replace(a, rules=a.rules[1:])
  traces = []

  def body(run, x):
    traces.append(run)
    return x + 1
  program = jax.jit(body, static_argnums=0)
  program(a, 1.0)
  program(b, 1.0)
  assert len(traces) == 1


def test_mesh_shape_resolves_minus_one_and_names_bad_axes():
  assert sharding.mesh_shape(dict(expert=2, data=-1, fsdp=2, tensor=1), 8) == dict(
      expert=2, data=2, fsdp=2, tensor=1)
  assert sharding.mesh_shape(dict(expert=1, data=-1, fsdp=1, tensor=1), 1)["data"] == 1
  with pytest.raises(ValueError, match="multiply to 12, but there are 8 devices"):
    sharding.mesh_shape(dict(expert=3, data=1, fsdp=2, tensor=2), 8)
  with pytest.raises(ValueError, match=r"config.mesh.expert=2 must divide the number of branches \(3\)"):
    sharding.mesh_shape(dict(expert=2, data=-1, fsdp=1, tensor=1), 8, num_branches=3)
  with pytest.raises(ValueError, match="only one axis may be -1"):
    sharding.mesh_shape(dict(expert=-1, data=-1, fsdp=1, tensor=1), 8)
  with pytest.raises(ValueError, match="config.mesh.tensor must be a positive integer"):
    sharding.mesh_shape(dict(expert=1, data=-1, fsdp=1, tensor=0), 8)
  mesh = sharding.make_mesh(dict(expert=2, data=-1, fsdp=2, tensor=1))
  assert dict(mesh.shape) == dict(expert=2, data=2, fsdp=2, tensor=1)


def test_validate_mesh_checks_pod_slice_not_local_devices():
  cfg = pod_4b.get_config()
  # 192 chips on the slice, 8 devices here: fine (the checkpoint and data left unset)
  config_lib.validate_config(config_lib.without_unset_paths(cfg))
  cfg.mesh.fsdp = 8
  with pytest.raises(ValueError, match="config.mesh"):
    config_lib.validate_mesh(cfg)
  cfg.mesh.update(dict(expert=2, fsdp=24))
  with pytest.raises(ValueError, match="config.mesh.expert=2 must divide"):
    config_lib.validate_mesh(cfg)


def test_parameter_specs_of_known_leaves():
  cfg = tiny_config(tie_embeddings=False)
  run = sharding.RunSharding(sharding.make_mesh(dict(expert=2, data=1, fsdp=2, tensor=2)),
                             param_axes=decoder.param_axes(cfg))
  params = jax.eval_shape(lambda k: experts.init_stacked(cfg, k), jax.random.split(jax.random.key(0), 2))
  specs = jax.tree.map(lambda s: s.spec, run.stacked_params(params))
  assert specs["embed_tokens"]["embedding"] == P("expert", "tensor", "fsdp")
  assert specs["layers_0"]["self_attn"]["q_proj"]["kernel"] == P("expert", "fsdp", "tensor")
  assert specs["layers_0"]["self_attn"]["o_proj"]["kernel"] == P("expert", "tensor", "fsdp")
  assert specs["layers_0"]["mlp"]["down_proj"]["kernel"] == P("expert", "tensor", "fsdp")
  assert specs["lm_head"]["kernel"] == P("expert", "fsdp", "tensor")
  assert specs["norm"]["scale"] == P("expert")
  # The vision tower is sharded too (its layers declare vision_* axes).
  assert specs["visual"]["patch_embed"]["kernel"] == P("expert", None, "fsdp")
  # A mesh axis that does not divide the dimension is dropped, not an error.
  assert sharding.logical_to_spec(("vocab", "embed"), mesh=run.mesh, shape=(47, 32)) == P(None, "fsdp")
  assert sharding.logical_to_spec(("batch",), mesh=sharding.make_mesh(
      dict(expert=1, data=2, fsdp=4, tensor=1)), shape=(6,)) == P("data")
  # Optimizer state mirrors the params; per-branch scalars shard over expert.
  opt = update_lib.init_optimizer_state
  state = jax.eval_shape(lambda p: opt(update_lib.make_optimizer(1e-3, 1.0), p), params)
  state_specs = [s.spec for s in jax.tree.leaves(run.opt_state(state))]
  assert P("expert", "fsdp", "tensor") in state_specs and P("expert") in state_specs


def opd_problem(cfg, s=2, native=2, cross=2, g=2, p=10, t=20, seed=0):
  """Stacked params, fixed Rows [S, (native+cross)*G, T] and live-teacher routing (student k
  distils from teacher (k + 1) % S on its cross rows)."""
  params = experts.init_stacked(cfg, jax.random.split(jax.random.key(seed), s))
  rng = np.random.default_rng(seed)
  r = (native + cross) * g
  v = cfg.vision
  response = np.zeros((s, r, t), np.float32)
  response[..., p - 1:-1] = 1
  tokens = rng.integers(4, cfg.vocab_size, size=(s, r, t)).astype(np.int32)
  # The G samples of a prompt share its prompt tokens and frames (as build_rows makes them).
  tokens[:, :, :p] = np.repeat(tokens[:, ::g, :p], g, axis=1)
  frames = rng.normal(size=(s, r // g, v.num_frames, v.image_size, v.image_size, v.channels))
  rows = trainer.Rows(
      tokens=tokens,
      positions=np.broadcast_to(np.arange(t, dtype=np.int32), (s, r, t)).copy(),
      token_mask=np.ones((s, r, t), bool), response_mask=response,
      old_logprobs=np.full((s, r, t), -3.0, np.float32),
      advantages=rng.normal(size=(s, r)).astype(np.float32),
      opd_beta=np.where(np.arange(r) >= native * g, 0.5, 0.0)[None].repeat(s, 0).astype(np.float32),
      frames=np.repeat(frames, g, axis=1).astype(np.float32))
  assignment = np.array([[(k + 1) % s] * cross for k in range(s)], np.int32)
  routing = stages.teacher_routing(assignment, s, g, native_rows=native * g)
  ucfg = trainer.UpdateConfig(model=cfg, loss=losses.PolicyLossConfig(),
                              kernel=kernels.KernelConfig(backend="chunked", vocab_tile=32,
                                                          token_tile=64),
                              samples_per_prompt=g)
  return params, rows, routing, ucfg, native * g


@pytest.fixture(scope="module")
def unsharded_step():
  """One CoPD distil step (live teachers, E=2) on a mesh of one device: the oracle,
  compiled once."""
  cfg = tiny_config(num_layers=1, vision=SMALL_VISION)
  params, rows, routing, ucfg, start = opd_problem(cfg)
  optimizer = optax.sgd(0.05)  # adam would amplify ulp-level gradient noise on ~0 grads
  state = update_lib.init_optimizer_state(optimizer, params)
  want = update_lib.update(update_lib.UpdateFn(one_device_run(ucfg.model), ucfg, optimizer),
                           update_lib.TrainState(params, state), jax.tree.map(jnp.asarray, rows),
                           scoring.Teachers(params, routing.as_arrays()))
  return params, rows, routing, ucfg, start, optimizer, state, want


@pytest.mark.parametrize("mesh_cfg,num_devices,micro_batch_rows", [
    (dict(expert=1, data=1, fsdp=1, tensor=1), 1, 0),
    (dict(expert=2, data=2, fsdp=2, tensor=1), 8, 0),
    (dict(expert=2, data=1, fsdp=2, tensor=2), 8, 4),
    # Both branches on every device (expert=1): they run one after the other.
    (dict(expert=1, data=1, fsdp=4, tensor=2), 8, 4)])
def test_update_on_a_mesh_matches_one_device(unsharded_step, mesh_cfg, num_devices,
                                            micro_batch_rows, monkeypatch):
  # The oracle sends whole rows (prompt_len=0) in one batch; the sharded runs send prompts
  # once per prompt (prompt_len=10), the last one in micro-batches of 4 rows.
  params, rows, routing, ucfg, start, optimizer, state, want = unsharded_step
  ucfg = dataclasses.replace(ucfg, micro_batch_rows=micro_batch_rows)
  run = sharding.RunSharding(sharding.make_mesh(mesh_cfg, jax.devices()[:num_devices]),
                             param_axes=decoder.param_axes(ucfg.model))
  traces = update_traces(monkeypatch)
  fn = update_lib.update_program(update_lib.UpdateFn(run, ucfg, optimizer))
  sharded = run.shard_params(params)
  host_routing = routing.as_tree()  # numpy, teacher_prompts a tuple (one per teacher)
  rows = dataclasses.replace(rows, prompt_len=10)
  got = fn(update_lib.TrainState(sharded, state), rows,
           scoring.Teachers(sharded, host_routing, start), None)
  got_params = got[0].params
  assert got_params["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec[0] == "expert"
  assert float(np.abs(np.asarray(want[1]["opd/tokens"])).min()) > 0
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(run.to_host(got))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
  fn(got[0], rows, scoring.Teachers(got_params, host_routing, start), None)
  assert len(traces) == 1  # one compile per stage


def test_opd_step_moves_no_parameter_sized_data_across_expert():
  # ~1.1M parameters per expert (4.3 MB) against 2 x 16 rows of 20 tokens.
  cfg = tiny_config(vocab_size=64, d_model=256, mlp_dim=1024, num_heads=4, num_kv_heads=2,
                    head_dim=64, num_layers=1, vision=SMALL_VISION)
  params, rows, routing, ucfg, start = opd_problem(cfg, native=4, cross=4)
  run = sharding.RunSharding(sharding.make_mesh(dict(expert=2, data=2, fsdp=2, tensor=1)),
                             param_axes=decoder.param_axes(cfg))
  optimizer = update_lib.make_optimizer(1e-3, 1.0)
  state = update_lib.init_optimizer_state(optimizer, params)
  fn = update_lib.update_program(update_lib.UpdateFn(run, ucfg, optimizer))
  sharded = run.shard_params(params)
  host_routing = routing.as_tree()  # numpy, teacher_prompts a tuple (one per teacher)
  hlo = fn.lower(update_lib.TrainState(sharded, state), dataclasses.replace(rows, prompt_len=10),
                 scoring.Teachers(sharded, host_routing, start), None).compile().as_text()
  param_bytes = abstract_step.tree_bytes(params) // 2
  assert param_bytes > 4_000_000
  # HLO shapes are per device: compare with one expert's parameter bytes per device.
  param_bytes_per_device = param_bytes // 4
  found = hlo_audit.collectives_crossing_axis(hlo, run.mesh)
  assert found["count"] > 0  # the token regroup does cross (the checker sees it)
  # ... and only as all-to-alls (each device sends its own rows), not gathers of every row.
  assert {c.kind for c in found["collectives"]} == {"all-to-all"}, found["collectives"]
  assert found["max_bytes"] < 0.01 * param_bytes_per_device, found["collectives"]
  assert found["total_bytes"] < 0.05 * param_bytes_per_device, found["collectives"]

  # Negative control: the merge (average over the expert axis) must register as crossing.
  merge = jax.jit(experts.merge, in_shardings=(run.stacked_params(params),),
                  out_shardings=run.stacked_params(jax.tree.map(lambda x: x[0], params),
                                                   stacked=False))
  merged_hlo = merge.lower(sharded).compile().as_text()
  control = hlo_audit.collectives_crossing_axis(merged_hlo, run.mesh)
  assert control["total_bytes"] > 0.5 * param_bytes_per_device


def test_hlo_group_formats():
  groups = hlo_audit.parse_device_groups
  assert groups("x replica_groups={{0,1},{2,3}}, y", 4) == [[0, 1], [2, 3]]
  assert groups("x replica_groups=[2,4]<=[8], y", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert groups("x replica_groups=[4,2]<=[2,4]T(1,0), y", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  assert groups("x replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, y", 8) == [
      [0, 4], [1, 5], [2, 6], [3, 7]]
  assert groups("x replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], "
                "device_ids=([2,4]T(1,0)) {'axis_1'}, y", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert groups("x source_target_pairs={{0,4},{4,0}}, y", 8) == [[0, 4], [4, 0]]
  with pytest.raises(ValueError, match="unparsed"):
    groups("x replica_groups=mesh['axis_0':(1)2] {'axis_0'}, y", 8)


def test_pod_config_update_lowers_with_abstract_shapes():
  cfg = pod_4b.get_config()
  # 4B widths, one layer, a few rows: lowering only (the full compile is bench_scale's).
  run = sharding.RunSharding(sharding.make_mesh(dict(expert=1, data=1, fsdp=4, tensor=2),
                                                num_branches=3),
                             param_axes=decoder.param_axes(
                                 ModelConfig.from_dict(cfg.model.to_dict())))
  fn, args = abstract_step.abstract_opd_update(spec_of(cfg), run, num_layers=1, native_prompts=1,
                                          cross_prompts=1)
  assert abstract_step.tree_bytes(args[0]) // 3 > 700e6  # 4B-wide embedding + one layer, f32
  lowered = fn.lower(*args)
  text = lowered.as_text()
  assert "151936" in text and "2560" in text
