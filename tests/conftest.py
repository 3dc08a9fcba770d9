"""Test setup: CPU only, 8 simulated devices, set before jax is imported."""
import os
import re

# COPD_TEST_NO_AMX=1: run as on a CPU without AMX (tests/no_amx.py), in this process and
# every process it starts (the xdist workers and the tests' subprocesses inherit it).
if os.environ.get("COPD_TEST_NO_AMX", "") not in ("", "0"):
  import no_amx
  no_amx.deny_amx()

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags = (flags + " --xla_force_host_platform_device_count=8").strip()
# 8 simulated devices on 2 cores (tests/xla_env.py): collectives wait for a starved device
# thread instead of aborting after 60 s, and XLA's thread pools have room for the threads
# a rendezvous blocks. Subprocesses inherit both.
import xla_env  # noqa: E402

# Compile at LLVM's optimisation level 0 (tests/xla_env.py: most of the suite's time is
# compiling; the level changes rounding, not results); a level given in XLA_FLAGS wins.
os.environ["XLA_FLAGS"] = xla_env.with_defaults(
    flags, xla_env.COLLECTIVE_TIMEOUT_FLAGS + xla_env.COMPILE_SPEED_FLAGS)
_devices = int(re.search(r"--xla_force_host_platform_device_count=(\d+)", flags).group(1))
os.environ.setdefault("PJRT_NPROC", str(xla_env.pool_threads(_devices)))

# One persistent compilation cache per test run, shared by the xdist workers and the
# subprocesses tests start (they inherit the environment): most of the suite's time is
# XLA compiling the same few programs (the micro model's sampler, update, evaluation) in
# file after file, and a compiled program read back from disk costs milliseconds. The
# controller (or the only process, with -n 0) makes the directory before any worker or
# jax starts and removes it at the end (pytest_unconfigure). A run given
# JAX_COMPILATION_CACHE_DIR keeps that directory (a persistent cache across runs).
import shutil  # noqa: E402
import tempfile  # noqa: E402

_OWN_CACHE_DIR = None
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="copd-jax-test-compile-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
# One directory per test run for what the workers share (tests/child_processes.py: the
# lock that keeps multi-device child processes from running beside each other).
import child_processes  # noqa: E402

_OWN_SHARED_DIR = None
if "PYTEST_XDIST_WORKER" not in os.environ and child_processes.SHARED_DIR_ENV not in os.environ:
  _OWN_SHARED_DIR = tempfile.mkdtemp(prefix="copd-jax-tests-")
  os.environ[child_processes.SHARED_DIR_ENV] = _OWN_SHARED_DIR
# Cache every program, however small and quick to compile (reading one back is quicker).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import gc

import pytest


def pytest_unconfigure(config):
  for own in (_OWN_CACHE_DIR, _OWN_SHARED_DIR):
    if own is not None:
      shutil.rmtree(own, ignore_errors=True)


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


# The longest test files of a full run, longest first (the per-file sums of
# `pytest --durations=0` under COPD_TEST_NO_AMX=1, each over about 50 worker-seconds), and
# started in this order: with whole files per worker, a long file that starts last keeps
# one worker busy after the other has run out of work (longest first is the classic
# greedy schedule for two machines). Files not listed follow in collection order.
LONGEST_FILES_FIRST = (
    "tests/rl/test_methods.py",
    "tests/test_resume.py",
    "tests/test_qwen3_vl_run.py",
    "tests/rl/test_lora_resume.py",
    "tests/kernels/test_pallas_tpu.py",
    "tests/models/test_layer_stack.py",
    "tests/test_sharding.py",
    "tests/experiments/test_scale_branches.py",
    "tests/rl/test_qwen3_vl_training.py",
    "tests/rl/test_update.py",
    "tests/test_multiprocess.py",
    "tests/rl/test_opd_estimators.py",
    "tests/kernels/test_sharded.py",
    "tests/kernels/test_ops.py",
    "tests/test_hf_path.py",
    "tests/models/test_policy.py",
    "tests/rl/test_lora_update.py",
    "tests/rl/test_teacher_layout.py",
    "tests/models/test_decoder.py",
    "tests/rl/test_lora_runs.py",
    "tests/rl/test_grpo_end_to_end.py",
    "tests/test_run_log.py",
    "tests/rl/test_update_semantics.py",
    "tests/models/test_lora.py",
    "tests/test_run_dir.py",
    "tests/rl/test_diagnostic_prompts.py",
    "tests/rl/test_nonfinite_updates.py",
    "tests/test_sampling.py",
)


def pytest_collection_modifyitems(session, config, items):
  rank = {path: i for i, path in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
