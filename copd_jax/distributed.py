"""Multi-process runs on JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program (`python -m copd_jax.main ...`) and sees all devices
of all processes through `jax.devices()`; the mesh (copd_jax/sharding.py) spans them.
Where a process learns its place, in order of precedence:

    flags:        --coordinator_address=HOST:PORT --num_processes=N --process_id=I
    environment:  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID

With neither, the run is single-process. On TPU pods `jax.distributed.initialize()` can
also discover everything itself: pass --coordinator_address=auto.

On CPU (tests, this machine) the cross-process collectives go through gloo; set it
before the backend starts, which is why `initialize` must run before any other JAX call.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from absl import flags

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator for a multi-process run ('auto' on TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  coordinator_address: str  # "host:port", or "auto" (let JAX discover the cluster)
  num_processes: int | None
  process_id: int | None


def _int_setting(name: str, value) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def resolve_settings(coordinator_address: str | None, num_processes, process_id,
                     environ: Mapping[str, str] = os.environ) -> DistributedSettings | None:
  """Settings from explicit values (flags) or the environment; None = single process.

  Raises ValueError naming the flag when the settings are incomplete or inconsistent.
  """
  address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  count = _int_setting("--num_processes", num_processes)
  if count is None:
    count = _int_setting(ENV_NUM_PROCESSES, environ.get(ENV_NUM_PROCESSES))
  index = _int_setting("--process_id", process_id)
  if index is None:
    index = _int_setting(ENV_PROCESS_ID, environ.get(ENV_PROCESS_ID))
  if address is None:
    if count not in (None, 1) or index not in (None, 0):
      raise ValueError("--num_processes/--process_id were given without "
                       "--coordinator_address (or JAX_COORDINATOR_ADDRESS)")
    return None
  if address == "auto":
    return DistributedSettings("auto", count, index)
  if ":" not in address:
    raise ValueError(f"--coordinator_address must be host:port, got {address!r}")
  if count is None or index is None:
    raise ValueError("a multi-process run needs --num_processes and --process_id "
                     "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID) with --coordinator_address")
  if count < 1:
    raise ValueError(f"--num_processes must be >= 1, got {count}")
  if not 0 <= index < count:
    raise ValueError(f"--process_id must be in [0, num_processes={count}), got {index}")
  return DistributedSettings(address, count, index)


def initialize(settings: DistributedSettings | None) -> None:
  """Joins the multi-process run (no-op for None). Call before any other JAX call."""
  if settings is None:
    return
  import jax
  # CPU devices need an explicit cross-process collective implementation; the setting
  # only concerns the CPU backend, so it is harmless on TPU/GPU hosts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if settings.coordinator_address == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(settings.coordinator_address,
                               num_processes=settings.num_processes,
                               process_id=settings.process_id)


def initialize_from_flags() -> DistributedSettings | None:
  """Reads the flags (then the environment) and joins the run; returns the settings."""
  settings = resolve_settings(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  initialize(settings)
  return settings


