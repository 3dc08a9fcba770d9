"""The Pallas kernels on a multi-device mesh (kernels/sharded.py): on the 8 simulated CPU
devices, under jax.set_mesh, every kernel call runs inside jax.shard_map (interpret mode)
and gives the values and gradients of the float64 numpy oracles and of the same call
without a mesh; and a small run's OPD update and sampler, whose loss and attention are
Pallas kernels, compile with the TPU compiler for a 4-chip v5p slice (they did not before
the shard_map: "Mosaic kernels cannot be automatically partitioned")."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import paths
from copd_jax.config_lib import spec_of
from copd_jax import kernels
from copd_jax.kernels import KernelConfig, attention, sharded

REPO = paths.REPO
PALLAS = KernelConfig(backend="pallas", interpret=True, token_tile=8, vocab_tile=128)
# 13 rows on 8 devices: padding rows are needed (to 16).
S, N, D, V, K = 2, 13, 16, 300, 3


def mesh(shape=(2, 1, 2, 2)):
  return Mesh(np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape),
              ("expert", "data", "fsdp", "tensor"))


def problem(seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(S, N, D))
  head = rng.normal(size=(S, D, V)) * 0.3
  tokens = rng.integers(0, V, size=(S, N))
  t_hidden = rng.normal(size=(S, N, D))
  t_head = rng.normal(size=(S, D, V)) * 0.3
  return hidden, head, tokens, t_hidden, t_head


def log_softmax64(hidden, head):
  z = hidden @ head
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# Per-token weights of the test losses: a different weight on every row, so a row moved,
# dropped or counted twice changes the loss and its gradient.
W_LP, W_ENT = np.linspace(-1.0, 2.0, N), np.linspace(0.5, -0.7, N)


def stats_loss64(hidden, head, tokens):
  """float64 oracle: sum_n W_LP[n] log p(t_n) + W_ENT[n] H(p_n), for one branch."""
  logp = log_softmax64(hidden, head)
  lp = logp[np.arange(len(tokens)), tokens]
  ent = -(np.exp(logp) * logp).sum(-1)
  return (W_LP * lp).sum() + (W_ENT * ent).sum(), lp, ent


def stats_grads64(hidden, head, tokens):
  """Analytic gradients of stats_loss64: dL/dz_v = W_LP (1[v=t] - p_v)
  + W_ENT * (-p_v (log p_v + H))."""
  logp = log_softmax64(hidden, head)
  p = np.exp(logp)
  ent = -(p * logp).sum(-1, keepdims=True)
  onehot = np.eye(head.shape[1])[tokens]
  dz = W_LP[:, None] * (onehot - p) + W_ENT[:, None] * (-p * (logp + ent))
  return dz @ head.T, hidden.T @ dz


def stats_fn(kernel, spmd_axis_name):
  def loss(h, w, t):
    lp, ent = kernels.token_logprob_entropy(h, w, t, kernel=kernel)
    return jnp.sum(lp * W_LP) + jnp.sum(ent * W_ENT), (lp, ent)
  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  return jax.jit(jax.vmap(grad, spmd_axis_name=spmd_axis_name))


def jaxpr_text(fn, *args):
  return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("spmd_axis_name", [None, "expert"])
def test_token_logprob_entropy_on_a_mesh_equals_the_oracle_and_one_device(spmd_axis_name):
  hidden, head, tokens, _, _ = problem()
  args = (jnp.asarray(hidden, jnp.float32), jnp.asarray(head, jnp.float32),
          jnp.asarray(tokens, jnp.int32))
  fn = stats_fn(PALLAS, spmd_axis_name)
  with jax.set_mesh(mesh()):
    assert "shard_map" in jaxpr_text(fn, *args)  # the kernel runs per device
    (loss, (lp, ent)), (d_h, d_w) = fn(*args)
  (loss1, (lp1, ent1)), (d_h1, d_w1) = stats_fn(PALLAS, None)(*args)  # no mesh
  assert "shard_map" not in jaxpr_text(stats_fn(PALLAS, None), *args)
  for s in range(S):
    want, want_lp, want_ent = stats_loss64(hidden[s], head[s], tokens[s])
    want_dh, want_dw = stats_grads64(hidden[s], head[s], tokens[s])
    np.testing.assert_allclose(lp[s], want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent[s], want_ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss[s], want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(d_h[s], want_dh, rtol=1e-4, atol=1e-5)
    # The head's gradient sums every device's rows exactly once.
    np.testing.assert_allclose(d_w[s], want_dw, rtol=1e-4, atol=1e-5)
  for got, one in ((lp, lp1), (ent, ent1), (d_h, d_h1), (d_w, d_w1)):
    np.testing.assert_allclose(got, one, rtol=1e-5, atol=1e-6)


def test_reverse_kl_and_teacher_top_k_on_a_mesh_equal_the_oracle():
  hidden, head, tokens, t_hidden, t_head = problem(1)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  weights = jnp.asarray(W_LP, jnp.float32)

  def rkl(sh, sw, th, tw):
    def loss(sh, sw):
      kl = kernels.full_vocab_reverse_kl(sh, sw, th, tw, kernel=PALLAS)
      return jnp.sum(kl * weights), kl
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(sh, sw)

  def top_k(h, w, t):
    return kernels.sampled_token_logprobs(h, w, t, kernel=PALLAS, top_k=K)

  rkl_fn = jax.jit(jax.vmap(rkl, spmd_axis_name="expert"))
  top_fn = jax.jit(jax.vmap(top_k, spmd_axis_name="expert"))
  args = (f32(hidden), f32(head), f32(t_hidden), f32(t_head))
  top_args = (f32(hidden), f32(head), jnp.asarray(tokens, jnp.int32))
  with jax.set_mesh(mesh()):
    assert "shard_map" in jaxpr_text(rkl_fn, *args)
    assert "shard_map" in jaxpr_text(top_fn, *top_args)
    (_, kl), (d_h, d_w) = rkl_fn(*args)
    scores = top_fn(*top_args)
  for s in range(S):
    ls, lt = log_softmax64(hidden[s], head[s]), log_softmax64(t_hidden[s], t_head[s])
    p = np.exp(ls)
    want_kl = (p * (ls - lt)).sum(-1)
    np.testing.assert_allclose(kl[s], want_kl, rtol=1e-4, atol=1e-5)
    # d KL / d z_s = p * (ls - lt - KL), weighted per row.
    dz = W_LP[:, None] * p * (ls - lt - want_kl[:, None])
    np.testing.assert_allclose(d_h[s], dz @ head[s].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_w[s], hidden[s].T @ dz, rtol=1e-4, atol=1e-5)
    order = np.argsort(-ls, axis=-1, kind="stable")[:, :K]
    np.testing.assert_array_equal(scores.top_k_ids[s], order)
    np.testing.assert_allclose(scores.top_k_logprobs[s],
                               np.take_along_axis(ls, order, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores.logprobs[s], ls[np.arange(N), tokens[s]],
                               rtol=1e-5, atol=1e-5)


def attention_problem(seed=0, n=3, tq=20, prefix=0, kv_heads=2, groups=2, hd=8):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(n, tq, kv_heads, groups, hd)) * hd ** -0.5
  k = rng.normal(size=(n, prefix + tq, kv_heads, hd))
  v = rng.normal(size=(n, prefix + tq, kv_heads, hd))
  kv_valid = np.ones((n, prefix + tq), bool)
  kv_valid[0, :3] = False  # left padding of row 0
  kv_valid[2, :1] = False
  q_valid = kv_valid[:, prefix:]
  return q, k, v, q_valid, kv_valid


@pytest.mark.parametrize("shape, kv_heads", [((2, 1, 2, 2), 2), ((1, 2, 1, 4), 2)])
def test_splash_attention_on_a_mesh_equals_the_oracle_and_one_device(shape, kv_heads):
  """Heads over `tensor` when it divides the kv heads (2 of 2), else rows over it too
  (2 kv heads on tensor=4)."""
  q, k, v, q_valid, kv_valid = attention_problem(kv_heads=kv_heads)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  cot = np.random.default_rng(5).normal(size=q.shape)
  valid_q = q_valid[:, :, None, None, None]

  def loss(q, k, v):
    out = attention.splash_attention(q, k, v, jnp.asarray(q_valid), jnp.asarray(kv_valid),
                                     block=128, interpret=True)
    return jnp.sum(jnp.where(valid_q, out * cot, 0.0)), out
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  args = (f32(q), f32(k), f32(v))
  with jax.set_mesh(mesh(shape)):
    assert "shard_map" in jaxpr_text(fn, *args)
    (_, out), grads = fn(*args)
  (_, out1), grads1 = fn(*args)  # no mesh
  want = attention.dense_reference(q, k, v, q_valid, kv_valid)
  np.testing.assert_allclose(np.where(valid_q, out, 0), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.where(valid_q, out, 0), np.where(valid_q, out1, 0),
                             rtol=1e-5, atol=1e-6)
  # Gradients: those of dense masked-softmax attention (plain jnp autodiff, another
  # implementation than the kernel's backward kernels), and those of the unsharded kernel.
  def dense_loss(q, k, v):
    scores = jnp.einsum("ntkgd,nskd->nkgts", q, k, precision="highest")
    causal = np.arange(k.shape[1])[None, :] <= np.arange(q.shape[1])[:, None]
    seen = causal[None, None, None] & kv_valid[:, None, None, None, :]
    weights = jax.nn.softmax(jnp.where(seen, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("nkgts,nskd->ntkgd", jnp.where(seen, weights, 0.0), v,
                     precision="highest")
    return jnp.sum(jnp.where(valid_q, out * cot, 0.0))
  want_grads = jax.grad(dense_loss, argnums=(0, 1, 2))(*args)
  for got, one, expect in zip(grads, grads1, want_grads):
    np.testing.assert_allclose(got, np.asarray(expect), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, one, rtol=1e-5, atol=1e-6)


def test_no_mesh_or_one_device_calls_the_kernel_directly():
  with jax.set_mesh(mesh((1, 1, 1, 1))):
    assert sharded.active_mesh() is None
  assert sharded.active_mesh() is None
  with jax.set_mesh(mesh()):
    assert sharded.free_axes(sharded.active_mesh()) == ("expert", "fsdp", "tensor")
  # Inside a shard_map over the whole mesh (as kernels/tpu_check.py calls the ops) there
  # is nothing left to split: the kernel runs on the device's rows as they are.
  hidden, head, tokens, _, _ = problem()
  m = mesh()

  def per_device(h, w, t):
    assert sharded.active_mesh() is None
    return kernels.token_logprob_entropy(h, w, t, kernel=PALLAS)[0]
  rows = jax.sharding.PartitionSpec(("expert", "fsdp", "tensor"))
  fn = jax.jit(jax.shard_map(per_device, mesh=m, in_specs=(rows, jax.sharding.PartitionSpec(),
                                                           rows),
                             out_specs=rows, check_vma=False))
  h = np.concatenate([hidden[0], hidden[0, :3]])  # 16 rows: 2 per device
  t = np.concatenate([tokens[0], tokens[0, :3]])
  with jax.set_mesh(m):
    lp = fn(jnp.asarray(h, jnp.float32), jnp.asarray(head[0], jnp.float32),
            jnp.asarray(t, jnp.int32))
  np.testing.assert_allclose(lp, log_softmax64(h, head[0])[np.arange(16), t], rtol=1e-5,
                             atol=1e-5)


@pytest.fixture(scope="module")
def small_pod_config():
  pytest.importorskip("libtpu")  # the test extra installs jax[tpu]
  from copd_jax import cli
  from copd_jax.analysis import tpu_compile
  return tpu_compile.small_config(spec_of(cli.load_config_file(
      os.path.join(REPO, "configs", "pod_4b.py"))))


def test_small_pod_opd_update_and_sampler_compile_for_a_4_chip_tpu_slice(small_pod_config):
  """pod_4b shrunk (Qwen3-VL, Pallas fused loss, splash attention) on v5p 2x2x1 with mesh
  fsdp=2 x tensor=2: without the shard_map every one of these programs failed with
  "Mosaic kernels cannot be automatically partitioned"."""
  from copd_jax.analysis import tpu_compile
  cfg = small_pod_config
  assert cfg.rl.kernel.backend == "pallas" and cfg.model.attention_kernel in ("splash", "auto")
  report = tpu_compile.compile_run(cfg, tpu_compile.SMALL_TOPOLOGY,
                                   names=("opd_update", "sampler"))
  for name in ("opd_update", "sampler"):
    fig = report[name]
    assert "error" not in fig, (name, fig.get("error", "")[:500])
    assert fig["per_device_bytes"] > 0 and fig["flops"] > 0
