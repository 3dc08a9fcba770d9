"""The backward matmuls of a bf16 model run in bf16 with f32 accumulation, as its forward
matmuls do: layers.project (every Linear) and cached_attention.einsum_f32 (attention's
einsums) round the f32 cotangent to the compute dtype before their gradient dots. In f32
nothing is rounded. Oracles: numpy on the bf16-rounded cotangent (bf16), jax's own
gradient of the plain einsum (f32, bit for bit), and the jaxpr's dot operand dtypes."""
import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from copd_jax.models import cached_attention, layers


def _bf16(x) -> np.ndarray:
  """x rounded to bf16, back in f32 (numpy, independent of jax)."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _dot_input_dtypes(fn, *args) -> set:
  """The operand dtypes of every dot_general in fn's jaxpr (nested jaxprs included)."""
  found = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _project_inputs():
  kx, kw, kt = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (5, 7, 16)).astype(jnp.bfloat16)
  kernel = jax.random.normal(kw, (16, 24)).astype(jnp.bfloat16)
  cotangent = jax.random.normal(kt, (5, 7, 24)) * 3.0  # f32, mostly not bf16-exact
  return x, kernel, cotangent


def test_project_bf16_gradient_is_the_rounded_cotangent_oracle():
  """dx = round(dy) @ W^T and dW = x^T round(dy), accumulated in f32, then bf16."""
  x, kernel, dy = _project_inputs()
  _, vjp = jax.vjp(layers.project, x, kernel)
  dx, dkernel = vjp(dy)
  assert dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.bfloat16
  x32, w32, dy32 = (np.asarray(a, np.float32) for a in (x, kernel, dy))
  dy_rounded = _bf16(dy32)
  want_dx = _bf16(dy_rounded @ w32.T)
  want_dw = _bf16(np.einsum("bti,bto->io", x32, dy_rounded))
  # Equal up to one bf16 rounding step of the output (the f32 sums' order differs).
  np.testing.assert_allclose(np.asarray(dx, np.float32), want_dx, rtol=2 ** -7, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dkernel, np.float32), want_dw, rtol=2 ** -7, atol=1e-6)
  # ...and measurably away from the unrounded cotangent's gradient for some entries
  # (so the oracle above can tell the two apart).
  assert np.max(np.abs(_bf16(dy32 @ w32.T) - want_dx)) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_project_gradient_dots_run_in_the_compute_dtype(dtype):
  x, kernel, dy = _project_inputs()
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  grads = lambda a, k: jax.vjp(layers.project, a, k)[1](dy)  # noqa: E731
  assert _dot_input_dtypes(grads, x, kernel) == {(dtype, dtype)}


SPECS = [  # the attention einsums of cached_attention, at small shapes
    ("btkgd,bskd->bkgts", (2, 5, 2, 3, 4), (2, 7, 2, 4)),
    ("bkgts,bskd->btkgd", (2, 2, 3, 5, 7), (2, 7, 2, 4)),
    ("bjtkgd,bksd->bjkgts", (2, 3, 5, 2, 3, 4), (2, 2, 7, 4)),
    ("btkgd,bksd->bkgts", (2, 5, 2, 3, 4), (2, 2, 7, 4)),
]


def _einsum_inputs(spec, shape_a, shape_b, dtype):
  ka, kb, kc = jax.random.split(jax.random.key(4), 3)
  a = jax.random.normal(ka, shape_a).astype(dtype)
  b = jax.random.normal(kb, shape_b).astype(dtype)
  out_shape = jnp.einsum(spec, a, b).shape
  return a, b, jax.random.normal(kc, out_shape) * 3.0


@pytest.mark.parametrize("spec,shape_a,shape_b", SPECS)
def test_einsum_f32_in_f32_matches_jax_gradient(spec, shape_a, shape_b):
  a, b, ct = _einsum_inputs(spec, shape_a, shape_b, jnp.float32)
  out, vjp = jax.vjp(lambda x, y: cached_attention.einsum_f32(spec, x, y), a, b)
  want_out, want_vjp = jax.vjp(
      lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32), a, b)
  np.testing.assert_array_equal(out, want_out)
  for got, want in zip(vjp(ct), want_vjp(ct)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec,shape_a,shape_b", SPECS)
def test_einsum_f32_bf16_gradient_is_the_rounded_cotangent_oracle(spec, shape_a, shape_b):
  a, b, ct = _einsum_inputs(spec, shape_a, shape_b, jnp.bfloat16)
  out, vjp = jax.vjp(lambda x, y: cached_attention.einsum_f32(spec, x, y), a, b)
  assert out.dtype == jnp.float32
  da, db = vjp(ct)
  assert da.dtype == jnp.bfloat16 and db.dtype == jnp.bfloat16
  operands, result = spec.split("->")
  in_a, in_b = operands.split(",")
  a32, b32, ct_rounded = np.asarray(a, np.float32), np.asarray(b, np.float32), _bf16(ct)
  want_da = _bf16(np.einsum(f"{result},{in_b}->{in_a}", ct_rounded, b32))
  want_db = _bf16(np.einsum(f"{result},{in_a}->{in_b}", ct_rounded, a32))
  np.testing.assert_allclose(np.asarray(da, np.float32), want_da, rtol=2 ** -7, atol=1e-6)
  np.testing.assert_allclose(np.asarray(db, np.float32), want_db, rtol=2 ** -7, atol=1e-6)
  grads = lambda x, y: jax.vjp(  # noqa: E731
      lambda p, q: cached_attention.einsum_f32(spec, p, q), x, y)[1](ct)
  assert _dot_input_dtypes(grads, a, b) == {("bfloat16", "bfloat16")}


def test_dense_attention_gradient_f32_matches_plain_einsum():
  """The whole attention (softmax between two einsum_f32 calls) against the same maths
  with jnp.einsum and jax's own gradient, in f32: bit for bit."""
  kq, kk, kv, kc = jax.random.split(jax.random.key(5), 4)
  n, t, kv_heads, groups, hd = 2, 6, 2, 2, 8
  q = jax.random.normal(kq, (n, t, kv_heads, groups, hd))
  k = jax.random.normal(kk, (n, t, kv_heads, hd))
  v = jax.random.normal(kv, (n, t, kv_heads, hd))
  mask = jnp.tril(jnp.ones((t, t), bool))[None].repeat(n, 0)
  ct = jax.random.normal(kc, (n, t, kv_heads, groups, hd))

  def plain(q, k, v):
    f32 = dict(preferred_element_type=jnp.float32)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, **f32)
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -1e30), axis=-1)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v, **f32)
  got = jax.vjp(lambda *a: cached_attention._dense_attention(*a, mask), q, k, v)[1](ct)
  want = jax.vjp(plain, q, k, v)[1](ct)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
