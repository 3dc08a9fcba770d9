"""A suite that passes every time on 2 cores (issue 30, item 8).

Found on main: tests/test_qwen3_vl_run.py::test_the_same_run_on_an_expert_mesh aborted in
its 6-device subprocess when XLA's CPU all-gather rendezvous waited longer than its limits
(20 s warning + 40 s termination), and later, with those limits raised, sat idle in the
same all-gather (tests/xla_env.py: XLA's thread pools had one thread per device). The
suite raises the limits on purpose and gives the pools room (tests/xla_env.py) for itself
and every multi-device subprocess. These tests pin that both are set and that they are
what decides: with tiny limits a 6 s delay aborts the process, with the suite's it is
waited for; XLA's intra-op pool has the threads PJRT_NPROC asks for."""
import os
import subprocess
import sys
import textwrap

import no_amx
import pytest
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
  child = xla_env.cpu_devices_env(3, os.environ)
  for flags in (os.environ["XLA_FLAGS"], child["XLA_FLAGS"]):
    assert seconds(flags, "xla_cpu_collective_call_warn_stuck_timeout_seconds") >= 60
    assert seconds(flags, "xla_cpu_collective_call_terminate_timeout_seconds") >= 600
    assert seconds(flags, "xla_cpu_collective_timeout_seconds") >= 600
  assert "--xla_force_host_platform_device_count=3" in child["XLA_FLAGS"].split()
  assert "--xla_force_host_platform_device_count=8" not in child["XLA_FLAGS"].split()


def level_flags(flags: str) -> list[str]:
  return [f for f in flags.split() if f.split("=")[0] == "--xla_backend_optimization_level"]


def test_the_suite_and_its_subprocesses_compile_at_llvm_level_0_unless_told_otherwise():
  """tests/xla_env.py: the suite compiles at LLVM's level 0 (COMPILE_SPEED_FLAGS), its
  child processes inherit it, and a level given in XLA_FLAGS is kept."""
  child = xla_env.cpu_devices_env(3, os.environ)
  for flags in (os.environ["XLA_FLAGS"], child["XLA_FLAGS"]):
    assert len(level_flags(flags)) == 1, flags
  assert level_flags(xla_env.with_defaults("--a=1", xla_env.COMPILE_SPEED_FLAGS)) == [
      "--xla_backend_optimization_level=0"]
  given = "--xla_backend_optimization_level=2 --xla_force_host_platform_device_count=8"
  assert xla_env.with_defaults(given, xla_env.COMPILE_SPEED_FLAGS) == given


def test_xla_thread_pools_have_room_beyond_the_threads_a_rendezvous_blocks():
  """tests/xla_env.py: one thread per device may block in a rendezvous and one more may
  wait for its parallel tasks; the pools (PJRT_NPROC) have more threads than both."""
  import jax
  for env, devices in ((os.environ, len(jax.devices())), (xla_env.cpu_devices_env(3, {}), 3)):
    assert int(env["PJRT_NPROC"]) > 2 * devices
  code = ("import os, jax, jax.numpy as jnp; jax.jit(lambda x: x @ x)(jnp.ones((256, 256)))"
          ".block_until_ready(); print(sum(open(f'/proc/self/task/{t}/comm').read().strip() "
          "== 'tf_XLAEigen' for t in os.listdir('/proc/self/task')))")
  out = subprocess.run([sys.executable, "-c", code], env=xla_env.cpu_devices_env(3, os.environ),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert int(out.stdout.split()[-1]) == xla_env.pool_threads(3)  # XLA read PJRT_NPROC


def test_the_rendezvous_limits_decide_whether_a_delayed_collective_aborts():
  tiny = ("--xla_force_host_platform_device_count=2 "
          "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1 "
          "--xla_cpu_collective_call_terminate_timeout_seconds=2")
  aborted = run_delayed_psum(tiny)
  assert aborted.returncode != 0 and "rendezvous" in aborted.stderr.lower(), aborted.stderr[-2000:]
  waited = run_delayed_psum(xla_env.cpu_devices_flags(2))
  assert waited.returncode == 0, waited.stderr[-2000:]
  assert "sum 2.0" in waited.stdout


AMX_PROBE = textwrap.dedent("""
    import sys
    import no_amx
    if sys.argv[1] == "deny":
      no_amx.deny_amx()
    import jax, jax.numpy as jnp
    a = jnp.full((64, 64), 0.5, jnp.bfloat16)
    y = jax.lax.dot(a, a, preferred_element_type=jnp.float32)  # YNNPACK's AMX kernel, if any
    print(float(y[0, 0]), no_amx.amx_permission_granted())
""")


def cpu_has_amx() -> bool:
  with open("/proc/cpuinfo") as f:
    return "amx_tile" in f.read().split()


@pytest.mark.skipif(not no_amx.supported(), reason="the emulation is Linux x86-64 only")
def test_the_no_amx_emulation_refuses_the_tile_permission_and_dots_still_compute():
  """COPD_TEST_NO_AMX=1 (tests/no_amx.py): the AMX permission request fails, the process
  (and its children) compute on AVX-512 instead, with the same results."""
  def probe(mode):
    out = subprocess.run([sys.executable, "-c", AMX_PROBE, mode], cwd=paths.TESTS,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()
  assert probe("deny") == ["16.0", "False"]
  if cpu_has_amx() and os.environ.get("COPD_TEST_NO_AMX", "") in ("", "0"):
    assert probe("allow") == ["16.0", "True"]  # (under the emulation the suite inherits it)
