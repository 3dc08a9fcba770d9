"""The environment of test processes that simulate several CPU devices on a machine with
fewer cores (the suite's 8 devices on 2 cores, and the multi-device child processes).

Thread pools. XLA:CPU runs every device's program on two pools of
max(PJRT_NPROC or the CPU count, devices) threads: one launches the devices' programs, the
other (intra-op) runs their thunks and the dot/fusion library's parallel tasks. A
collective thunk is handed to the intra-op pool and blocks its thread until every device
of its group arrives (a rendezvous). With exactly one thread per device, the threads of
the devices that arrived first can all be blocked there while a late device's remaining
work (a parallel dot's tasks, the thunks after an asynchronous one) waits in that pool's
queue for a free thread: no thread is free, nothing runs, the process sits at 0% CPU. Two
runs of the suite stalled that way ("diagnostics at step 2": 4 of 6 devices waiting in an
all-gather over devices [0,2,4] / [1,3,5], the process idle). Whether it happens depends
on the order the threads were scheduled in, i.e. on the machine's load. The tests give
the pools 2 threads per device and 2 more (PJRT_NPROC), so the threads a rendezvous holds
never exhaust them.

Rendezvous limits. Every device's thread must arrive within
`xla_cpu_collective_call_warn_stuck_timeout_seconds` (default 20) plus
`xla_cpu_collective_call_terminate_timeout_seconds` (default 40), or the process aborts
("Expected N threads to join the rendezvous, but not all of them arrived on time"). A
device thread starved by a busy 2-core machine can be that late: the tests warn after
120 s (the log names the waiting collective early) and abort after 1,200 s, far beyond
any starved thread and still short of a child process's budget.

Compile speed. Most of the suite's time is XLA:CPU compiling small programs, and a good
part of each compile is LLVM optimising the generated code, which the tests' tiny shapes
gain nothing from: the tests compile at LLVM's level 0 (COMPILE_SPEED_FLAGS; two of the
update tests' files took 97 s instead of 134 s). This changes how the CPU code rounds, not
what it computes: fast-math is off at either level (XLA:CPU's default: no reassociation,
NaN and infinity kept), but the levels contract a*b+c into fused multiply-adds and
vectorise elementwise maths differently, so results differ by rounding. Measured: the micro model's loss bitwise equal, its
gradients within 7e-8 absolute; exp / log1p / softmax / logsumexp / cumsum within 31 ulps.
Every comparison in the suite is between programs compiled alike or against numpy within
a tolerance, and the whole suite passes at level 0. Dots run in precompiled libraries
(YNNPACK, oneDNN, Eigen) that the flag does not touch. libtpu reads XLA_FLAGS too: a
deviceless TPU compile gave the same optimised program and memory figures at both levels.
"""
import re

COLLECTIVE_TIMEOUT_FLAGS = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
    "--xla_cpu_collective_call_terminate_timeout_seconds=1200",
    "--xla_cpu_collective_timeout_seconds=1200",
)


COMPILE_SPEED_FLAGS = ("--xla_backend_optimization_level=0",)


def with_defaults(flags: str, defaults) -> str:
  """`flags` plus each of `defaults` whose name it does not give (a flag already given
  keeps its value)."""
  out = flags.split()
  for flag in defaults:
    name = flag.split("=")[0]
    if not any(f.split("=")[0] == name for f in out):
      out.append(flag)
  return " ".join(out)


def with_collective_timeouts(flags: str) -> str:
  """`flags` plus COLLECTIVE_TIMEOUT_FLAGS (a flag already given keeps its value)."""
  return with_defaults(flags, COLLECTIVE_TIMEOUT_FLAGS)


def cpu_devices_flags(devices: int, flags: str = "") -> str:
  """XLA_FLAGS for `devices` simulated CPU devices with the raised collective timeouts
  (any device count already in `flags` is replaced)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
  return with_collective_timeouts(f"--xla_force_host_platform_device_count={devices} {flags}")


def pool_threads(devices: int) -> int:
  """XLA:CPU thread-pool size for `devices` simulated devices: one thread per device may
  block in a rendezvous and one more may wait for its parallel tasks; 2 spare threads run
  those tasks."""
  return 2 * devices + 2


def cpu_devices_env(devices: int, env: dict) -> dict:
  """A copy of env for a child process with `devices` simulated CPU devices: XLA_FLAGS
  (device count, rendezvous limits) and the thread-pool size (PJRT_NPROC)."""
  return dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS=cpu_devices_flags(devices, env.get("XLA_FLAGS", "")),
              PJRT_NPROC=str(pool_threads(devices)))
