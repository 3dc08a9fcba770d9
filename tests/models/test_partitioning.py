"""Parameter shardings come from the logical axes each layer declares (flax partitioning
metadata), for the toy policy, Qwen3 and Qwen3-VL (vision tower included), unrolled and
scanned; a parameter without a declaration is an error naming it."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import paths
from copd_jax import policy_setup, sharding
from copd_jax.models import decoder, layers, partitioning, qwen3_vl, qwen3_vl_config
from copd_jax.rl import update as update_lib
from tests.tiny_model import tiny_config

FIXTURE = os.path.join(paths.TESTS, "fixtures", "hf", "qwen3_vl_tiny")
RULE_NAMES = {name for name, _ in sharding.LOGICAL_AXIS_RULES}


def toy_cfg(**kw):
  return tiny_config(tie_embeddings=False, **kw)


def qwen3_cfg(**kw):  # the Qwen3 text decoder: no vision tower
  return tiny_config(vision=None, image_token_id=-1, tie_embeddings=False, **kw)


def vl_cfg(scan=False):
  from copd_jax.models import hf_checkpoint
  cfg = qwen3_vl_config.Qwen3VLConfig.from_hf(hf_checkpoint.read_hf_config(FIXTURE))
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, scan_layers=scan))


def abstract_params(cfg):
  return jax.eval_shape(lambda k: policy_setup.init_policy_params(cfg, k), jax.random.key(0))


def flat(tree):
  return {partitioning.path_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


MODELS = {
    "toy": lambda scan: toy_cfg(scan_layers=scan),
    "qwen3": lambda scan: qwen3_cfg(scan_layers=scan),
    "qwen3_vl": vl_cfg,
}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(dict(expert=2, data=1, fsdp=2, tensor=2), jax.devices()[:8])


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_parameter_gets_its_sharding_from_its_declaration(model, scan, mesh):
  cfg = MODELS[model](scan)
  declared = policy_setup.declared_param_axes(cfg)
  params = abstract_params(cfg)
  leaves = flat(params)
  assert set(declared) == set(leaves)  # one declaration per parameter, nothing else
  for path, axes in declared.items():
    assert len(axes) == leaves[path].ndim, path
    assert set(axes) - {None} <= RULE_NAMES, (path, axes)
    if scan and path[0] == "layers":
      assert axes[0] == "layers", path  # the scan's own axis leads
  stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2,) + x.shape, x.dtype), params)
  run = sharding.RunSharding(mesh, param_axes=declared)
  specs = flat(jax.tree.map(lambda s: s.spec, run.stacked_params(stacked)))
  for path, spec in specs.items():
    want = sharding.logical_to_spec(("expert",) + declared[path], mesh=mesh,
                                    shape=(2,) + leaves[path].shape)
    assert spec == want, path


def test_hand_written_specs(mesh):
  """Pinned by hand (mesh expert=2, fsdp=2, tensor=2): kernels [in, out] shard in over
  fsdp and out over tensor; embeddings rows (vocab) over tensor, d_model over fsdp."""
  def specs(cfg):
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2,) + x.shape, x.dtype),
                          abstract_params(cfg))
    run = sharding.RunSharding(mesh, param_axes=policy_setup.declared_param_axes(cfg))
    return flat(jax.tree.map(lambda s: s.spec, run.stacked_params(params)))

  toy = specs(toy_cfg())
  assert toy[("layers_0", "self_attn", "q_proj", "kernel")] == P("expert", "fsdp", "tensor")
  assert toy[("layers_1", "self_attn", "o_proj", "kernel")] == P("expert", "tensor", "fsdp")
  assert toy[("layers_0", "mlp", "down_proj", "kernel")] == P("expert", "tensor", "fsdp")
  assert toy[("embed_tokens", "embedding")] == P("expert", "tensor", "fsdp")
  assert toy[("lm_head", "kernel")] == P("expert", "fsdp", "tensor")
  assert toy[("norm", "scale")] == P("expert")
  assert toy[("layers_0", "self_attn", "k_norm", "scale")] == P("expert")
  # the toy vision tower is sharded, not replicated: width 16 over fsdp, MLP 32 over tensor
  assert toy[("visual", "blocks_0", "linear_fc1", "kernel")] == P("expert", "fsdp", "tensor")
  assert toy[("visual", "blocks_0", "linear_fc1", "bias")] == P("expert", "tensor")

  scanned = specs(toy_cfg(scan_layers=True))
  assert scanned[("layers", "self_attn", "q_proj", "kernel")] == P("expert", None, "fsdp",
                                                                    "tensor")

  vl = specs(vl_cfg())
  assert vl[("layers_0", "self_attn", "q_proj", "kernel")] == P("expert", "fsdp", "tensor")
  assert vl[("embed_tokens", "embedding")] == P("expert", "tensor", "fsdp")
  assert vl[("visual", "blocks_0", "mlp", "linear_fc1", "kernel")] == P("expert", "fsdp",
                                                                        "tensor")
  assert vl[("visual", "blocks_2", "attn", "qkv", "kernel")] == P("expert", "fsdp", "tensor")
  assert vl[("visual", "blocks_2", "attn", "proj", "kernel")] == P("expert", "tensor", "fsdp")
  assert vl[("visual", "pos_embed")] == P("expert", None, "fsdp")
  assert vl[("visual", "merger", "linear_fc2", "kernel")] == P("expert", "tensor", "fsdp")
  # Qwen3-VL's vision tower is not replicated: every vision matrix is split somewhere.
  vision = {p: s for p, s in vl.items() if p[0] == "visual" and p[-1] in ("kernel",
                                                                          "pos_embed")}
  assert len(vision) > 10 and all(len(tuple(s)) > 1 for s in vision.values()), vision


def test_optimizer_state_follows_the_declarations(mesh):
  cfg = toy_cfg()
  run = sharding.RunSharding(mesh, param_axes=decoder.param_axes(cfg))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2,) + x.shape, x.dtype),
                        abstract_params(cfg))
  optimizer = update_lib.make_optimizer(1e-3, 1.0)
  state = jax.eval_shape(lambda p: update_lib.init_optimizer_state(optimizer, p), params)
  specs = [(partitioning.path_names(p), s.spec) for p, s in
           jax.tree_util.tree_flatten_with_path(run.opt_state(state))[0]]
  mu_q = [s for p, s in specs if p[-4:] == ("layers_0", "self_attn", "q_proj", "kernel")]
  assert mu_q and all(s == P("expert", "fsdp", "tensor") for s in mu_q)
  counts = [s for p, s in specs if p[-1:] == ("count",)]
  assert counts and all(s == P("expert") for s in counts)


# --------------------------------------------------------------------------- errors


class StrayPolicy(decoder.Policy):
  """The toy policy plus one parameter created without logical axes."""

  def setup(self):
    super().setup()
    self.stray = layers.Linear(4, name="stray")  # no axes=

  def init_all(self, *args):
    hidden = super().init_all(*args)
    self.stray(hidden)
    return hidden


def test_a_parameter_without_axes_is_a_named_error():
  cfg = toy_cfg()
  tokens = jnp.zeros((1, 2), jnp.int32)
  v = cfg.vision
  vision = jnp.zeros((1, v.num_frames, v.image_size, v.image_size, v.channels))
  boxed = jax.eval_shape(lambda k: StrayPolicy(cfg).init(
      k, tokens, tokens, jnp.ones((1, 2), bool), vision,
      method=StrayPolicy.init_all)["params"], jax.random.key(0))
  with pytest.raises(partitioning.UndeclaredAxesError, match=r"stray/kernel \(32, 4\)"):
    partitioning.declared_axes(boxed)


def test_a_bare_param_without_axes_is_a_named_error():
  class Bare(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.zeros, (3,))
      return layers.Linear(3, axes=("embed", "mlp"), name="ok")(x) + w

  boxed = jax.eval_shape(lambda: Bare().init(jax.random.key(0), jnp.ones((1, 2)))["params"])
  with pytest.raises(partitioning.UndeclaredAxesError, match=r"'?w \(3,\)"):
    partitioning.declared_axes(boxed)
  with pytest.raises(partitioning.UndeclaredAxesError, match="declares"):  # wrong rank
    partitioning.declared_axes({"x": nn.LogicallyPartitioned(jnp.zeros((2, 2)), ("embed",))})


def test_run_sharding_rejects_undeclared_leaves(mesh):
  cfg = toy_cfg()
  run = sharding.RunSharding(mesh, param_axes=decoder.param_axes(cfg))
  params = dict(abstract_params(cfg), stray={"kernel": jax.ShapeDtypeStruct((32, 4),
                                                                           jnp.float32)})
  with pytest.raises(sharding.UndeclaredParameterError, match="parameter stray/kernel"):
    run.stacked_params(params, stacked=False)
  # a layout the declarations do not describe (scanned params, unrolled declarations)
  scanned = abstract_params(toy_cfg(scan_layers=True))
  with pytest.raises(sharding.UndeclaredParameterError, match="parameter layers/"):
    run.stacked_params(scanned, stacked=False)
  with pytest.raises(sharding.UndeclaredParameterError, match="optimizer-state leaf .*stray"):
    run.opt_state({"mu": {"stray": jax.ShapeDtypeStruct((2, 3), jnp.float32)}})
  with pytest.raises(sharding.UndeclaredParameterError, match="param_axes"):
    sharding.RunSharding(mesh).stacked_params(abstract_params(cfg))


def test_sharded_params_really_are_split(mesh):
  """Placed on the mesh, a q projection holds a quarter of its [in, out] per device."""
  cfg = qwen3_cfg()
  run = sharding.RunSharding(mesh, param_axes=decoder.param_axes(cfg))
  params = decoder.init_params(cfg, jax.random.key(0))
  placed = run.shard_params(params, stacked=False)
  q = placed["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape == (16, 16)  # [32, 32] over fsdp x tensor
  np.testing.assert_array_equal(np.asarray(q), np.asarray(params["layers_0"]["self_attn"]
                                                           ["q_proj"]["kernel"]))


@pytest.mark.parametrize("expert, in_sequence", [(2, False), (1, True)])
def test_branches_run_in_sequence_only_when_they_share_every_device(expert, in_sequence):
  """map_over_branches: vmapped with the branch axis on `expert` when the mesh has an
  expert group per branch; with expert=1 on 8 devices (every device holds every branch)
  one branch after another (a loop in the program). Same values either way."""
  def fn(x, y):  # a per-branch computation with a pytree output
    return {"sum": jnp.sum(x * y[:, None]), "scaled": x * jnp.sum(y)}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
  mesh = sharding.make_mesh(dict(expert=expert, data=1, fsdp=-1, tensor=2), jax.devices()[:8])
  run = lambda a, b: partitioning.map_over_branches(fn, a, b, spmd_axis_name="expert")  # noqa: E731
  with jax.set_mesh(mesh):
    text = str(jax.make_jaxpr(run)(x, y))
    got = jax.jit(run)(x, y)
  assert ("scan" in text) == in_sequence
  want = {"sum": jnp.sum(x * y[:, :, None], axis=(1, 2)),
          "scaled": x * jnp.sum(y, axis=1)[:, None, None]}
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
  # No mesh (one device): vmapped.
  assert "scan" not in str(jax.make_jaxpr(run)(x, y))
