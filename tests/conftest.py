"""Test setup: CPU only, 8 simulated devices, set before jax is imported."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

# One persistent compilation cache for the whole run: most of the suite's time is XLA
# compiling, and many tests (and the `python -m copd_jax.main` subprocesses they start)
# compile the same programs. A cache hit loads the executable XLA would build again, so
# results are unchanged. The first process to import this file (pytest itself, before it
# starts xdist workers and subprocesses, which inherit the variables) makes the directory
# and removes it at exit. A size limit turns on jax's file lock, so concurrent workers
# never read an entry another is still writing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="copd-jax-tests-jit-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


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
