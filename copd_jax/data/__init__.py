"""Data: examples and their encoding, the toy task suite, record files, grain streams,
tokenizers and verifiers. Imports nothing of ours outside copd_jax.data."""
