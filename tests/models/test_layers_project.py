"""layers.project (Linear's matmul with a hand-written VJP) against autodiff of the plain
einsum: the same values and gradients, in f32 and bf16, with and without a vmapped
expert axis."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from copd_jax.models import layers


def einsum_projection(x, kernel):
  return jnp.einsum("...i,io->...o", x, kernel, preferred_element_type=jnp.float32)


def weighted_sum(project_fn, weights):
  return lambda x, kernel: jnp.sum(jnp.sin(project_fn(x, kernel)) * weights)


# bf16: project's gradient dots round the cotangent to bf16 (einsum's own gradient keeps it
# f32), so they differ by a bf16 rounding; test_mixed_precision_grads pins the bf16 values.
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("leading", [(7,), (2, 3, 5)])
def test_project_matches_einsum_values_and_gradients(dtype, tol, leading):
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, leading + (16,)).astype(dtype)
  kernel = jax.random.normal(kw, (16, 24)).astype(dtype)
  weights = jax.random.normal(kt, leading + (24,))
  y = layers.project(x, kernel)
  assert y.dtype == jnp.float32 and y.shape == leading + (24,)
  np.testing.assert_allclose(y, einsum_projection(x, kernel), rtol=tol, atol=tol)
  got = jax.grad(weighted_sum(layers.project, weights), (0, 1))(x, kernel)
  want = jax.grad(weighted_sum(einsum_projection, weights), (0, 1))(x, kernel)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol)


def test_project_gradients_under_vmap_over_experts():
  """Stacked experts [S, ...]: the update vmaps the model over the expert axis."""
  kx, kw, kt = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (3, 4, 6, 8))
  kernel = jax.random.normal(kw, (3, 8, 5))
  weights = jax.random.normal(kt, (4, 6, 5))
  got = jax.vmap(jax.grad(weighted_sum(layers.project, weights), (0, 1)))(x, kernel)
  want = jax.vmap(jax.grad(weighted_sum(einsum_projection, weights), (0, 1)))(x, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_project_kernel_gradient_by_hand():
  """d/dkernel of sum(x @ kernel * t) is x^T t (an oracle independent of autodiff)."""
  x = jnp.arange(6.0).reshape(3, 2)
  t = jnp.array([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0], [3.0, 0.0, -2.0]])
  kernel = jnp.ones((2, 3))
  grad_x, grad_kernel = jax.grad(lambda a, k: jnp.sum(layers.project(a, k) * t), (0, 1))(
      x, kernel)
  np.testing.assert_allclose(grad_kernel, np.asarray(x).T @ np.asarray(t), rtol=1e-6)
  np.testing.assert_allclose(grad_x, np.asarray(t) @ np.asarray(kernel).T, rtol=1e-6)
