"""Fused LM-head kernels: every backend held to the dense reference.

Tiny shapes and coarse tiles keep Pallas interpret mode fast (~2.5 ms per grid step).
V = 70 with vocab_tile = 32 and N = 13 with token_tile = 8 (pallas) or 5 (chunked) make
every tiled run have a ragged last tile in both directions (vocabulary and token count
not multiples of the tile).

Tolerances: f32 inputs, values and gradients within 1e-5 (relative + absolute) of the
reference. bf16 hidden states (f32 head, f32 accumulation): values within 1e-5 relative
of the bf16 reference; gradients within 2e-2 of the largest gradient entry (the tiled
backward multiplies in bf16, as mixed-precision training does).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from copd_jax.kernels import (
  KernelConfig,
  full_vocab_reverse_kl,
  fused_policy_loss,
  sampled_token_logprobs,
  sequence_policy_loss,
  token_logprob_entropy,
)
from copd_jax import losses as obj
from copd_jax.losses import PolicyLossConfig

N, D, V = 13, 16, 70
REFERENCE = KernelConfig("reference")
CHUNKED = KernelConfig("chunked", token_tile=5, vocab_tile=32)
PALLAS = KernelConfig("pallas", token_tile=8, vocab_tile=32, interpret=True)
PALLAS_TPU = KernelConfig("pallas", token_tile=8, vocab_tile=32, interpret="tpu")
TILED = [CHUNKED, PALLAS, PALLAS_TPU]
TILED_IDS = ["chunked", "pallas-interpret", "pallas-tpu-interpret"]

FULL_LOSS = PolicyLossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.05,
                             kl_estimator="k3", entropy_coef=0.01)


def make_problem(seed=0, n=N, d=D, v=V, dtype=jnp.float32, logit_scale=1.0):
  keys = jax.random.split(jax.random.key(seed), 8)
  hidden = jax.random.normal(keys[0], (n, d)).astype(dtype)
  head = jax.random.normal(keys[1], (d, v)) * (logit_scale / np.sqrt(d))
  tokens = jax.random.randint(keys[2], (n,), 0, v)
  mask = jnp.arange(n) < n - 3                       # last 3 positions are padding
  tokens = jnp.where(mask, tokens, -1)               # padding ids outside the vocabulary
  return dict(
      hidden=hidden, head=head, tokens=tokens, mask=mask,
      advantages=jax.random.normal(keys[3], (n,)),
      old_logprobs=-3.0 - jax.random.uniform(keys[4], (n,)) * 2,
      ref_logprobs=-3.0 - jax.random.uniform(keys[5], (n,)) * 2,
      teacher_logprobs=-3.0 - jax.random.uniform(keys[6], (n,)) * 2,
      opd_beta=jnp.where(jnp.arange(n) % 2 == 0, 0.5, 0.0),  # half the tokens cross-distilled
  )


def loss_and_grads(problem, kernel, config=FULL_LOSS):
  """jit(value_and_grad) of the fused policy loss w.r.t. (hidden, head)."""
  rest = {k: v for k, v in problem.items() if k not in ("hidden", "head")}

  @jax.jit
  def run(hidden, head):
    def loss(hidden, head):
      total, denom, aux = fused_policy_loss(hidden, head, config=config, kernel=kernel,
                                            **rest)
      return obj.mean_from_sum(total, denom), (total, denom, aux)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, head)

  return run(problem["hidden"], problem["head"])


def assert_close(actual, expected, tol=1e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             rtol=tol, atol=tol)


def assert_close_to_max(actual, expected, tol):
  """Max error relative to the largest entry (gradients in bf16)."""
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  scale = np.abs(expected).max()
  assert np.abs(actual - expected).max() <= tol * scale, np.abs(actual - expected).max() / scale


# ------------------------------------------------------------ backends vs reference
@pytest.mark.parametrize("kernel", TILED, ids=TILED_IDS)
def test_token_stats_values_and_grads_match_reference(kernel):
  p = make_problem(seed=1)
  tokens = jnp.where(p["mask"], p["tokens"], 0)
  g_lp, g_ent = jax.random.normal(jax.random.key(9), (2, N))

  def run(kernel):
    def f(hidden, head):
      lp, ent = token_logprob_entropy(hidden, head, tokens, kernel=kernel)
      return jnp.sum(lp * g_lp + ent * g_ent), (lp, ent)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(p["hidden"], p["head"])

  (_, (lp, ent)), grads = run(kernel)
  (_, (lp_ref, ent_ref)), grads_ref = run(REFERENCE)
  assert_close(lp, lp_ref)
  assert_close(ent, ent_ref)
  for g, g_ref in zip(grads, grads_ref):
    assert_close(g, g_ref)


@pytest.mark.parametrize("kernel", TILED, ids=TILED_IDS)
def test_fused_policy_loss_matches_reference(kernel):
  """PG with asymmetric + dual clip, OPD advantage on half the tokens, k3 KL, entropy."""
  p = make_problem(seed=2)
  (loss, (total, denom, aux)), grads = loss_and_grads(p, kernel)
  (loss_r, (total_r, denom_r, aux_r)), grads_r = loss_and_grads(p, REFERENCE)
  assert float(denom) == float(denom_r) == N - 3
  assert_close(total, total_r)
  assert_close(loss, loss_r)
  for name in ("logprobs", "entropy", "kl", "ratio", "pg_loss", "token_loss", "advantages"):
    valid = np.asarray(p["mask"])
    assert_close(np.asarray(aux[name])[valid], np.asarray(aux_r[name])[valid])
  for g, g_ref in zip(grads, grads_r):
    assert np.abs(np.asarray(g_ref)).max() > 1e-3  # the check is not vacuous
    assert_close(g, g_ref)


def test_reference_gradient_matches_finite_differences():
  """The oracle itself: autodiff of the dense loss against central differences (f64-free)."""
  p = make_problem(seed=3, n=5, d=4, v=9)
  rest = {k: v for k, v in p.items() if k not in ("hidden", "head")}

  def loss(hidden):
    total, denom, _ = fused_policy_loss(hidden, p["head"], config=FULL_LOSS,
                                        kernel=REFERENCE, **rest)
    return total / denom

  grad = jax.grad(loss)(p["hidden"])
  direction = jax.random.normal(jax.random.key(4), p["hidden"].shape)
  eps = 1e-2
  loss = jax.jit(loss)
  step = eps * direction
  numeric = (loss(p["hidden"] + step) - loss(p["hidden"] - step)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(numeric), rtol=2e-2)


@pytest.mark.parametrize("kernel", [CHUNKED, PALLAS], ids=["chunked", "pallas-interpret"])
def test_bf16_hidden_with_f32_accumulation(kernel):
  p = make_problem(seed=5, dtype=jnp.bfloat16)
  (loss, (_, _, aux)), grads = loss_and_grads(p, kernel)
  (loss_r, (_, _, aux_r)), grads_r = loss_and_grads(p, REFERENCE)
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32
  valid = np.asarray(p["mask"])
  assert_close(np.asarray(aux["logprobs"])[valid], np.asarray(aux_r["logprobs"])[valid])
  assert_close(loss, loss_r)
  for g, g_ref in zip(grads, grads_r):
    assert_close_to_max(g, g_ref, 2e-2)


# ------------------------------------------------------------------ tile invariance
@pytest.mark.parametrize("kernels", [
    [KernelConfig("chunked", token_tile=tm, vocab_tile=tv)
     for tm, tv in ((13, 70), (4, 7), (6, 32), (100, 256))],
    [KernelConfig("pallas", token_tile=tm, vocab_tile=tv, interpret=True)
     for tm, tv in ((13, 70), (4, 48), (8, 128))],
], ids=["chunked", "pallas-interpret"])
def test_results_do_not_depend_on_tile_size(kernels):
  p = make_problem(seed=6)
  results = [loss_and_grads(p, k) for k in kernels]
  (_, (_, _, aux0)), grads0 = results[0]
  valid = np.asarray(p["mask"])
  for (_, (_, _, aux)), grads in results[1:]:
    assert_close(np.asarray(aux["logprobs"])[valid], np.asarray(aux0["logprobs"])[valid])
    assert_close(aux["entropy"], aux0["entropy"])
    for g, g0 in zip(grads, grads0):
      assert_close(g, g0)


def test_chunked_never_materialises_logits():
  """Compiled temporary memory (abstract shapes, nothing allocated) stays far below N x V."""
  n, d, v = 1024, 64, 16384
  logits_bytes = n * v * 4

  def temp_bytes(kernel):
    def loss(hidden, head, tokens, advantages, old_logprobs, mask):
      total, denom, _ = fused_policy_loss(hidden, head, tokens, advantages, old_logprobs,
                                          mask, kernel=kernel)
      return total / denom
    shapes = [((n, d), jnp.float32), ((d, v), jnp.float32), ((n,), jnp.int32),
              ((n,), jnp.float32), ((n,), jnp.float32), ((n,), jnp.bool_)]
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    lowered = step.lower(*(jax.ShapeDtypeStruct(*s) for s in shapes))
    return lowered.compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(REFERENCE) >= logits_bytes
  assert temp_bytes(KernelConfig("chunked", token_tile=256, vocab_tile=1024)) < logits_bytes / 8


# ---------------------------------------------------------------- masks and edges
def test_masked_positions_have_no_effect_and_get_no_gradient():
  p = make_problem(seed=7)
  (loss, _), (d_hidden, _) = loss_and_grads(p, CHUNKED)
  padded = ~np.asarray(p["mask"])
  np.testing.assert_array_equal(np.asarray(d_hidden)[padded], 0.0)
  changed = dict(p, hidden=p["hidden"].at[-3:].set(100.0), tokens=p["tokens"].at[-3:].set(-7),
                 advantages=p["advantages"].at[-3:].set(1e6))
  (loss2, _), _ = loss_and_grads(changed, CHUNKED)
  assert_close(loss2, loss)


@pytest.mark.parametrize("kernel", TILED, ids=TILED_IDS)
def test_all_masked_batch_gives_zero_loss_and_zero_finite_grads(kernel):
  p = make_problem(seed=8)
  p = dict(p, mask=jnp.zeros(N, bool), tokens=jnp.full((N,), -1))
  (loss, (total, denom, _)), grads = loss_and_grads(p, kernel)
  assert float(loss) == 0.0 and float(total) == 0.0 and float(denom) == 0.0
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("kernel", TILED, ids=TILED_IDS)
def test_logits_of_magnitude_1e4_stay_finite_and_match(kernel):
  p = make_problem(seed=9, logit_scale=3e3)
  logits = p["hidden"] @ p["head"]
  assert float(jnp.abs(logits).max()) > 1e4
  (loss, (_, _, aux)), grads = loss_and_grads(p, kernel)
  (loss_r, (_, _, aux_r)), grads_r = loss_and_grads(p, REFERENCE)
  for x in (loss, aux["logprobs"], aux["entropy"], *grads):
    assert np.isfinite(np.asarray(x)).all()
  valid = np.asarray(p["mask"])
  np.testing.assert_allclose(np.asarray(aux["logprobs"])[valid],
                             np.asarray(aux_r["logprobs"])[valid], rtol=1e-5, atol=1e-2)
  np.testing.assert_allclose(aux["entropy"], aux_r["entropy"], atol=1e-3)
  for g, g_ref in zip(grads, grads_r):
    assert_close_to_max(g, g_ref, 1e-4)


# ---------------------------------------------------------------- expert axis
@pytest.mark.parametrize("kernel", [CHUNKED, PALLAS_TPU], ids=["chunked", "pallas-tpu-interpret"])
def test_vmap_over_expert_axis_equals_per_expert_calls(kernel):
  experts = [make_problem(seed=s) for s in (10, 11)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *experts)
  rest_keys = [k for k in stacked if k not in ("hidden", "head")]

  def one_expert(hidden, head, rest):
    def loss(hidden, head):
      total, denom, _ = fused_policy_loss(hidden, head, config=FULL_LOSS, kernel=kernel,
                                          **rest)
      return total / denom
    return jax.value_and_grad(loss, argnums=(0, 1))(hidden, head)

  batched = jax.jit(jax.vmap(one_expert))(stacked["hidden"], stacked["head"],
                                          {k: stacked[k] for k in rest_keys})
  single_expert = jax.jit(one_expert)
  for e, p in enumerate(experts):
    single = single_expert(p["hidden"], p["head"], {k: p[k] for k in rest_keys})
    for b, s in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
      assert_close(b[e], s)


# ------------------------------------------------------------------ teacher side
@pytest.mark.parametrize("kernel", [CHUNKED, PALLAS], ids=["chunked", "pallas-interpret"])
def test_sampled_token_logprobs_match_reference(kernel):
  p = make_problem(seed=12)
  tokens = jnp.where(p["mask"], p["tokens"], 0)
  lp = jax.jit(functools.partial(sampled_token_logprobs, kernel=kernel))(p["hidden"], p["head"],
                                                                         tokens)
  expected = obj.token_logprobs_from_logits(p["hidden"] @ p["head"], tokens)
  assert lp.shape == (N,)
  assert_close(lp, expected)


@pytest.mark.parametrize("kernel", [CHUNKED, PALLAS_TPU], ids=["chunked", "pallas-tpu-interpret"])
def test_teacher_top_k_matches_reference_with_ties_and_sequence_shape(kernel):
    # Small integers and quarters make every logit exact, so ties are real ties (many,
    # across tiles); lax.top_k breaks them by lower vocabulary id, and so must we.
  keys = jax.random.split(jax.random.key(13), 3)
  hidden = jax.random.randint(keys[0], (3, 4, D), -2, 3).astype(jnp.float32)
  head = jax.random.randint(keys[1], (D, V), -2, 3).astype(jnp.float32) / 4
  tokens = jax.random.randint(keys[2], (3, 4), 0, V)
  k = 7
  scores = jax.jit(functools.partial(sampled_token_logprobs, kernel=kernel, top_k=k))(
      hidden, head, tokens)
  dense = jax.nn.log_softmax(hidden @ head, axis=-1)
  values_ref, ids_ref = jax.lax.top_k(dense, k)
  assert int(jnp.sum(values_ref[..., 1:] == values_ref[..., :-1])) > 5  # ties inside the top k
  assert scores.top_k_ids.shape == (3, 4, k) and scores.logprobs.shape == (3, 4)
  np.testing.assert_array_equal(scores.top_k_ids, ids_ref)
  assert_close(scores.top_k_logprobs, values_ref)
  assert_close(scores.logprobs, jnp.take_along_axis(dense, tokens[..., None], -1)[..., 0])
  with pytest.raises(ValueError, match="top_k"):
    sampled_token_logprobs(hidden, head, tokens, kernel=kernel, top_k=V + 1)


# ------------------------------------------------------------- full-vocab reverse KL
@pytest.mark.parametrize("kernel", TILED, ids=TILED_IDS)
def test_full_vocab_reverse_kl_matches_reference_and_trains_student_only(kernel):
  p = make_problem(seed=14)
  t_hidden = jax.random.normal(jax.random.key(15), (N, 8))     # teacher of another width
  t_head = jax.random.normal(jax.random.key(16), (8, V)) * 0.5
  weights = jax.random.uniform(jax.random.key(17), (N,))

  def run(kernel):
    def f(s_hidden, s_head, t_hidden, t_head):
      kl = full_vocab_reverse_kl(s_hidden, s_head, t_hidden, t_head, kernel=kernel)
      return jnp.sum(kl * weights), kl
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
        p["hidden"], p["head"], t_hidden, t_head)

  (_, kl), grads = run(kernel)
  (_, kl_ref), grads_ref = run(REFERENCE)
  assert_close(kl_ref, obj.reverse_kl_from_logits(p["hidden"] @ p["head"], t_hidden @ t_head))
  assert_close(kl, kl_ref)
  assert float(kl.min()) >= 0.0
  for g, g_ref in zip(grads[:2], grads_ref[:2]):
    assert_close(g, g_ref)
  for g in (*grads[2:], *grads_ref[2:]):
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ------------------------------------------------------------- sequence wrapper
@pytest.mark.parametrize("mode", obj.AGGREGATIONS)
def test_sequence_policy_loss_aggregation_modes(mode):
  b, t = 3, 4
  p = make_problem(seed=18, n=b * t)
  config = PolicyLossConfig(aggregation=mode)
  seq = {k: p[k].reshape(b, t) for k in ("tokens", "mask", "old_logprobs")}
  mask = seq["mask"].at[2].set(False)                       # one empty sequence
  advantages = jnp.array([1.0, -0.5, 2.0])                  # one per sequence
  total, denom, aux = sequence_policy_loss(
      p["hidden"].reshape(b, t, D), p["head"], seq["tokens"], advantages,
      seq["old_logprobs"], mask, config=config, kernel=CHUNKED)
  assert aux["logprobs"].shape == (b, t)
  np.testing.assert_allclose(aux["advantages"], jnp.broadcast_to(advantages[:, None], (b, t)))
  expected = obj.aggregate_token_losses(aux["token_loss"], mask, mode)
  assert_close(total, expected[0])
  assert_close(denom, expected[1])
  flat_total, flat_denom, _ = fused_policy_loss(
      p["hidden"], p["head"], p["tokens"], jnp.repeat(advantages, t), p["old_logprobs"],
      mask.reshape(-1), kernel=CHUNKED)
  if mode == "token_mean":
    assert_close(flat_total, total)
    assert_close(flat_denom, denom)


# --------------------------------------------------------------------- bad input
def _call(config=PolicyLossConfig(), **overrides):
  p = make_problem(seed=19)
  args = dict(hidden=p["hidden"], head=p["head"], tokens=p["tokens"],
              advantages=p["advantages"], old_logprobs=p["old_logprobs"], mask=p["mask"])
  args.update(overrides)
  return fused_policy_loss(**args, config=config, kernel=CHUNKED)


@pytest.mark.parametrize("overrides, field", [
    (dict(head=jnp.zeros((D + 1, V))), "head"),
    (dict(head=jnp.zeros((D,))), "head"),
    (dict(tokens=jnp.zeros(N, jnp.float32)), "tokens"),
    (dict(tokens=jnp.zeros(N - 1, jnp.int32)), "tokens"),
    (dict(mask=jnp.ones(N - 1)), "mask"),
    (dict(old_logprobs=jnp.zeros((N, 1))), "old_logprobs"),
    (dict(advantages=jnp.zeros(N + 2)), "advantages"),
    (dict(hidden=jnp.zeros((N, D), jnp.int32)), "hidden"),
])
def test_bad_inputs_raise_value_error_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    _call(**overrides)


def test_kernel_config_defaults_per_backend():
  assert KernelConfig("chunked").tokens_per_tile == 2048
  assert KernelConfig("pallas").columns_per_tile is None  # per TPU generation (tpu_tiles)
  assert KernelConfig("pallas", vocab_tile=256).columns_per_tile == 256
  assert KernelConfig("chunked", vocab_tile=96).columns_per_tile == 96
  hash(KernelConfig())  # static jit argument


def test_bad_configs_raise_value_error_naming_the_field():
  with pytest.raises(ValueError, match="backend"):
    KernelConfig("triton")
  with pytest.raises(ValueError, match="vocab_tile"):
    KernelConfig("chunked", vocab_tile=0)
  with pytest.raises(ValueError, match="interpret"):
    KernelConfig("chunked", interpret=True)
  with pytest.raises(ValueError, match="interpret"):  # pallas cannot compile for cpu
    token_logprob_entropy(jnp.zeros((4, 8)), jnp.zeros((8, 16)), jnp.zeros(4, jnp.int32),
                          kernel=KernelConfig("pallas"))
  with pytest.raises(ValueError, match="aggregation"):
    _call(config=PolicyLossConfig(aggregation="seq_sum_constant"))
  with pytest.raises(ValueError, match="ref_logprobs"):
    _call(config=PolicyLossConfig(kl_coef=0.1))
  with pytest.raises(ValueError, match="opd_beta"):
    _call(teacher_logprobs=jnp.zeros(N))


# ------------------------------------------------------- inside jax.shard_map
@pytest.mark.parametrize("op", ["token_logprob_entropy", "reverse_kl"])
def test_pallas_gradients_inside_shard_map_with_check_vma_match_the_full_batch(op):
  """Tokens split over 2 devices, head replicated, check_vma=True (shard_map's default):
  each device's d_hidden rows and the head gradient summed over devices equal the dense
  reference's on the whole batch (the kernels declare how their outputs vary; the head's
  cotangent is summed over the axis the head is replicated on)."""
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  n = 16
  p = make_problem(seed=20, n=n)
  tokens = jnp.where(p["mask"], p["tokens"], 0)
  t_hidden = jax.random.normal(jax.random.key(21), (n, D))
  t_head = jax.random.normal(jax.random.key(22), (D, V)) * 0.5
  weights = jax.random.uniform(jax.random.key(23), (n,))

  def grads(kernel):
    def loss(hidden, head, tokens, t_hidden, weights):
      if op == "token_logprob_entropy":
        lp, ent = token_logprob_entropy(hidden, head, tokens, kernel=kernel)
        per_token = lp + 0.3 * ent
      else:
        per_token = full_vocab_reverse_kl(hidden, head, t_hidden, t_head, kernel=kernel)
      return jnp.sum(per_token * weights)
    return jax.grad(loss, argnums=(0, 1))

  sharded = jax.jit(jax.shard_map(
      grads(PALLAS_TPU), mesh=mesh, in_specs=(P("data"), P(), P("data"), P("data"), P("data")),
      out_specs=(P("data"), P())))
  d_hidden, d_head = sharded(p["hidden"], p["head"], tokens, t_hidden, weights)
  d_hidden_ref, d_head_ref = jax.jit(grads(REFERENCE))(p["hidden"], p["head"], tokens,
                                                        t_hidden, weights)
  assert_close(d_hidden, d_hidden_ref)
  assert_close(d_head, d_head_ref)
