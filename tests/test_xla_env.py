"""A suite that passes every time on 2 cores (issue 30, item 8).

Found on main: tests/test_qwen3_vl_run.py::test_the_same_run_on_an_expert_mesh aborted in
its 6-device subprocess when XLA's CPU all-gather rendezvous waited longer than its limits
(20 s warning + 40 s termination) for a device thread starved by the other pytest worker.
The suite now raises those limits on purpose (tests/xla_env.py) for itself and every
multi-device subprocess. These tests pin that the flags are set, and that they are the
flags that decide: with tiny limits a 6 s delay aborts the process; with the suite's it
is waited for."""
import os
import subprocess
import sys
import textwrap

import xla_env

import paths

REPO = paths.REPO

# Two devices meet in a psum; device 0 first sleeps `delay` seconds in a host callback,
# so device 1 waits at the rendezvous that long (a starved thread, made deterministic).
DELAYED_PSUM = textwrap.dedent("""
    import time, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    def slow(i):
      if int(i) == 0:
        time.sleep(6)
      return np.float32(1.0)
    def body(x):
      y = jax.pure_callback(slow, jax.ShapeDtypeStruct((), jnp.float32),
                            jax.lax.axis_index("x"))
      return jax.lax.psum(x * y, "x")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P()))
    print("sum", float(f(jnp.ones(2))[0]), flush=True)
""")


def run_delayed_psum(xla_flags: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  return subprocess.run([sys.executable, "-c", DELAYED_PSUM], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def seconds(flags: str, name: str) -> int:
  values = [int(f.split("=")[1]) for f in flags.split() if f.split("=")[0] == f"--{name}"]
  assert len(values) == 1, (name, flags)
  return values[0]


def test_the_suite_and_its_subprocesses_wait_for_starved_device_threads():
  for flags in (os.environ["XLA_FLAGS"], xla_env.cpu_devices_flags(6)):
    assert seconds(flags, "xla_cpu_collective_call_warn_stuck_timeout_seconds") >= 300
    assert seconds(flags, "xla_cpu_collective_call_terminate_timeout_seconds") >= 3600
    assert seconds(flags, "xla_cpu_collective_timeout_seconds") >= 3600
  assert "--xla_force_host_platform_device_count=6" in xla_env.cpu_devices_flags(6).split()


def test_the_rendezvous_limits_decide_whether_a_delayed_collective_aborts():
  tiny = ("--xla_force_host_platform_device_count=2 "
          "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1 "
          "--xla_cpu_collective_call_terminate_timeout_seconds=2")
  aborted = run_delayed_psum(tiny)
  assert aborted.returncode != 0 and "rendezvous" in aborted.stderr.lower(), aborted.stderr[-2000:]
  waited = run_delayed_psum(xla_env.cpu_devices_flags(2))
  assert waited.returncode == 0, waited.stderr[-2000:]
  assert "sum 2.0" in waited.stdout
