"""Test setup: CPU only, 8 simulated devices, set before jax is imported."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags = (flags + " --xla_force_host_platform_device_count=8").strip()
# 8 simulated devices on 2 cores: collectives wait for a starved device thread instead of
# aborting after 60 s (tests/xla_env.py). Subprocesses inherit these flags.
from xla_env import with_collective_timeouts  # noqa: E402

os.environ["XLA_FLAGS"] = with_collective_timeouts(flags)


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
