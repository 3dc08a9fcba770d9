"""copd-jax: Co-Evolving Policy Distillation (CoPD) in JAX/Flax."""

__version__ = "0.1.0"
