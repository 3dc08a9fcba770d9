"""Fused policy-loss kernels, installed as `copd_jax.kernels` (see setup.py)."""
