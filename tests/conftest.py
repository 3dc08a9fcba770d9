"""Test setup: CPU only, 8 simulated devices, set before jax is imported."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()


import gc

import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module.

  XLA's CPU backend maps each executable's code into memory, and jit caches keep the
  executables alive. Over the whole suite (thousands of compilations in one process) the
  mappings reached the kernel's per-process limit (vm.max_map_count, 65530), after which
  XLA's compiler segfaulted. Modules never share compiled programs, so clearing between
  them costs nothing but recompiling what the next module would compile anyway."""
  yield
  import jax
  jax.clear_caches()
  gc.collect()
