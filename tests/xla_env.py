"""XLA flags for tests that simulate several CPU devices on a machine with fewer cores.

XLA's CPU collectives meet in a rendezvous: every device's thread must arrive within
`xla_cpu_collective_call_warn_stuck_timeout_seconds` (default 20) plus
`xla_cpu_collective_call_terminate_timeout_seconds` (default 40), or the process aborts
("Expected N threads to join the rendezvous, but not all of them arrived on time"). With 6
or 8 simulated devices on 2 cores and another pytest worker busy, a device's thread can be
starved for longer than that: the run is correct but slow, and the abort made the suite's
result depend on the machine's load. The tests raise both limits on purpose (and the
collective timeout with them), so a starved thread is waited for instead.
"""
import re

COLLECTIVE_TIMEOUT_FLAGS = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300",
    "--xla_cpu_collective_call_terminate_timeout_seconds=3600",
    "--xla_cpu_collective_timeout_seconds=3600",
)


def with_collective_timeouts(flags: str) -> str:
  """`flags` plus COLLECTIVE_TIMEOUT_FLAGS (a flag already given keeps its value)."""
  out = flags.split()
  for flag in COLLECTIVE_TIMEOUT_FLAGS:
    name = flag.split("=")[0]
    if not any(f.split("=")[0] == name for f in out):
      out.append(flag)
  return " ".join(out)


def cpu_devices_flags(devices: int, flags: str = "") -> str:
  """XLA_FLAGS for `devices` simulated CPU devices with the raised collective timeouts
  (any device count already in `flags` is replaced)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
  return with_collective_timeouts(f"--xla_force_host_platform_device_count={devices} {flags}")
