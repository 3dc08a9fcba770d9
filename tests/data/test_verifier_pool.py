"""Issue 30, item 1: the verifier pool's processes are bounded.

No more workers than the CPUs (config error), and never more than a batch has requests;
workers die with their parent from their first statement, also when it is SIGKILLed while
they are still starting; each worker has a memory limit, and one over it scores 0, is
replaced and counted. Every test here starts at most 3 worker processes at a time."""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import process_checks

import paths
from copd_jax import config_lib, default_config
from copd_jax.data import math_verifier, verifier_pool
from copd_jax.data import verifiers as verifiers_lib

REPO = pathlib.Path(paths.REPO)
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _stat_fields(pid: int) -> list[str] | None:
  """/proc/<pid>/stat after the command name: [state, ppid, ...], or None if gone."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[-1].split()
  except (FileNotFoundError, ProcessLookupError):
    return None


def _alive(pid: int) -> bool:
  fields = _stat_fields(pid)
  return fields is not None and fields[0] != "Z"  # a zombie has ended


def _live_children(parent: int) -> set[int]:
  """The pids of the live (not zombie) child processes of `parent`, read from /proc."""
  out = set()
  for name in os.listdir("/proc"):
    if name.isdigit():
      fields = _stat_fields(int(name))
      if fields is not None and fields[0] != "Z" and int(fields[1]) == parent:
        out.add(int(name))
  return out


# ----------------------------------------------------------- no more than the work

def test_pool_at_the_cap_starts_no_more_workers_than_requests(monkeypatch):
  # A machine with 3 CPUs allowed: a pool of 3 workers (the cap) and 1 request -> 1
  # process; 3 requests -> at most 3. (Before: `size` processes whatever the work.)
  monkeypatch.setattr(verifier_pool, "cpu_cap", lambda: 3)
  before = _live_children(os.getpid())
  pool = math_verifier.VerifierPool(3)
  try:
    results, _ = pool.run([("math", "7", "7")], timeout_s=30)
    assert results == [1.0]
    started = _live_children(os.getpid()) - before
    assert len(started) == 1, f"1 request started {len(started)} worker processes"
    results, _ = pool.run([("math", "7", "7"), ("math", "8", "7"), ("math", "9", "9")],
                          timeout_s=30)
    assert results == [1.0, 0.0, 1.0]
    started = _live_children(os.getpid()) - before
    assert 1 <= len(started) <= 3 and set(pool.pids()) == started
  finally:
    pool.stop()
  assert not _live_children(os.getpid()) - before  # stop() ends them all


def test_a_timed_out_worker_is_not_replaced_when_no_work_is_left():
  before = _live_children(os.getpid())
  pool = math_verifier.VerifierPool(1)
  try:
    results, stats = pool.run([("math", "7", "9^{9^{9^{9}}}")], timeout_s=0.5)
    assert results == [0.0] and stats.timeouts == 1 and stats.restarts == 0
    assert not _live_children(os.getpid()) - before  # killed, nothing started for nothing
    assert pool.run([("math", "7", "7")], timeout_s=30)[0] == [1.0]  # starts what it needs
  finally:
    pool.stop()


# -------------------------------------------------------------------- the CPU cap

@pytest.mark.parametrize("extra", [1, 10**6])
def test_more_workers_than_cpus_is_a_config_error_naming_field_and_cap(extra):
  cap = verifier_pool.cpu_cap()
  cfg = default_config.get("copd", "micro")
  cfg.reward.workers = cap + extra
  with pytest.raises(ValueError, match=rf"config\.reward\.workers must be at most {cap} "):
    config_lib.validate_config(cfg)
  with pytest.raises(ValueError, match=rf"config\.reward\.workers must be at most {cap} "):
    math_verifier.RewardConfig(workers=cap + extra)
  with pytest.raises(ValueError, match=rf"1 to {cap} workers"):
    math_verifier.VerifierPool(cap + extra)


@pytest.mark.parametrize("field, value, message", [
    ("worker_memory_mb", 100, "at least 256"), ("worker_memory_mb", 0, "positive integer"),
    ("max_error_fraction", 1.5, r"\[0, 1\]"), ("max_error_fraction", -0.1, "non-negative")])
def test_new_reward_fields_are_checked(field, value, message):
  cfg = default_config.get("copd", "micro")
  cfg.reward[field] = value
  with pytest.raises(ValueError, match=rf"config\.reward\.{field} .*{message}"):
    config_lib.validate_config(cfg)


# ------------------------------------------------------------ death with the parent

# The pool's owner. Under multiprocessing's spawn (the old way) each worker re-imported
# this file as __mp_main__ before its parent-death watch was in place; the sleep stands
# for that slow start (JAX's import, hundreds of workers on 2 cores). A worker started by
# verifier_pool's bootstrap never runs it.
OWNER = textwrap.dedent("""
    import sys, threading, time
    if __name__ == "__mp_main__":
      time.sleep(30)
    from copd_jax.data import math_verifier
    if __name__ == "__main__":
      pool = math_verifier.VerifierPool(int(sys.argv[1]))
      requests = [("math", "7", "7"), ("math", "8", "8"), ("math", "9", "9")]
      threading.Thread(target=pool.run, args=(requests, 60.0), daemon=True).start()
      while len(pool.pids()) < pool.size:
        time.sleep(0.01)
      print(*pool.pids(), flush=True)  # still starting: importing sympy takes seconds
      time.sleep(3600)
""")


def test_workers_die_when_their_parent_is_killed_while_they_start(tmp_path):
  owner = tmp_path / "owner.py"
  owner.write_text(OWNER)
  workers = min(2, verifier_pool.cpu_cap())
  parent = subprocess.Popen([sys.executable, str(owner), str(workers)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == workers and all(_alive(p) for p in pids)
  finally:
    parent.kill()  # SIGKILL: no handler, no atexit
    parent.wait()
  time.sleep(5.0)
  survivors = [p for p in pids if _alive(p)]
  for pid in survivors:
    os.kill(pid, signal.SIGKILL)
  assert not survivors, f"{len(survivors)} of {len(pids)} workers outlived their parent by 5 s"


SLOW_OWNER = textwrap.dedent("""
    import threading, time
    from copd_jax.data import verifier_pool
    pool = verifier_pool.VerifierPool(1, entry="slow_entry:main", args=())
    threading.Thread(target=pool.run, args=([("anything",)], 60.0), daemon=True).start()
    while not pool.pids():
      time.sleep(0.01)
    print(pool.pids()[0], flush=True)
    time.sleep(3600)
""")


def test_a_worker_dies_with_its_parent_while_its_imports_run(tmp_path):
  # The worker's entry module takes 120 s to import, so nothing the worker does after its
  # imports (the parent-id watch thread) can end it in time: only the parent-death
  # signal set by the bootstrap's first statements can.
  marker = tmp_path / "importing"
  (tmp_path / "slow_entry.py").write_text(
      f"import time\nopen({str(marker)!r}, 'w').close()\ntime.sleep(120)\n"
      "def main(conn, parent):\n  pass\n")
  (tmp_path / "owner.py").write_text(SLOW_OWNER)
  parent = subprocess.Popen([sys.executable, str(tmp_path / "owner.py")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    worker = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert marker.exists() and _alive(worker)
  finally:
    parent.kill()
    parent.wait()
  assert not process_checks.outlives(worker, 5.0), \
      "the worker outlived its SIGKILLed parent by 5 s"


def test_a_worker_whose_parent_already_died_exits_before_importing_anything(tmp_path):
  # The race: the parent dies between the fork and the worker's prctl. The bootstrap
  # compares the parent id it was given with its actual one and exits at once.
  marker = tmp_path / "imported"
  entry_module = tmp_path / "entry_probe.py"
  entry_module.write_text(f"open({str(marker)!r}, 'w').close()\ndef main(*a):\n  pass\n")
  import socket
  from multiprocessing.connection import Connection
  a, b = socket.socketpair()
  ours = Connection(a.detach())
  ours.send(([str(tmp_path)] + sys.path, ()))  # what the pool sends: without the check,
  try:                                         # the worker would import entry_probe
    not_my_parent = 1 if os.getpid() != 1 else 2
    started = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-c", verifier_pool._BOOTSTRAP, str(not_my_parent), str(b.fileno()),
         "512", "entry_probe:main"], pass_fds=(b.fileno(),), cwd=tmp_path, timeout=60)
    assert child.returncode == 0 and time.monotonic() - started < 30
    assert not marker.exists(), "the worker ran its entry point although its parent was gone"
  finally:
    ours.close()
    b.close()


# -------------------------------------------------------------------- memory limit

ALLOCATING_PLUGIN = """
def score(response, example):
  if response == "allocate":
    block = bytearray(900 << 20)  # 900 MiB: over the 400 MiB limit
    return float(len(block))
  return float(response == example.answer)
"""


def test_a_worker_over_its_memory_limit_scores_0_is_replaced_and_counted(
    tmp_path, monkeypatch, capsys):
  (tmp_path / "alloc_rewards.py").write_text(ALLOCATING_PLUGIN)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = math_verifier.RewardConfig(fn="alloc_rewards:score", workers=1,
                                      worker_memory_mb=400, timeout_s=60.0)
  example = math_verifier.RewardExample(capability="math", question="q", answer="7")
  pool = math_verifier.shared_pool(config)
  rewards, stats = verifiers_lib.score(["7", "allocate", "7 "], [example] * 3, config)
  assert rewards.tolist() == [1.0, 0.0, 0.0]  # '7 ' != '7': scored by the fresh worker
  assert stats.memory_exceeded == 1 and stats.restarts == 1 and stats.timeouts == 0
  assert stats.errors == 0  # running out of memory is not the plug-in's error
  assert "ran out of their 400 MiB (config.reward.worker_memory_mb)" in capsys.readouterr().err
  assert pool.memory_exceeded_total == 1 and len(pool.pids()) == 1
  rewards, stats = verifiers_lib.score(["7"], [example], config)  # the replacement works
  assert rewards.tolist() == [1.0] and stats.memory_exceeded == 0


def test_a_memory_limit_too_small_to_start_names_the_field():
  pool = math_verifier.VerifierPool(1, memory_mb=40)
  try:
    with pytest.raises(RuntimeError, match=r"worker_memory_mb=40 is too small"):
      pool.run([("math", "7", "7")], timeout_s=30)
  finally:
    pool.stop()


# ------------------------------------------------- several reward functions, one cap

TWO_PLUGINS = textwrap.dedent("""
    def has_seven(response, example):
      return 1.0 if "7" in response else 0.0

    def is_short(response, example):
      return 1.0 if len(response) < 3 else 0.0
""")


def test_every_reward_function_shares_one_pool_of_at_most_workers(tmp_path, monkeypatch):
  # Before: one pool per reward.fns entry, each of reward.workers processes, so three
  # functions held 3 x workers verifier processes alive between steps.
  from copd_jax.data import reward_fns
  (tmp_path / "two_rewards.py").write_text(TWO_PLUGINS)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(verifier_pool, "cpu_cap", lambda: 2)
  monkeypatch.setattr(math_verifier, "cpu_cap", lambda: 2)
  cfg = default_config.get("copd", "micro").reward
  cfg.fns, cfg.workers, cfg.timeout_s = "verifier,two_rewards:has_seven,two_rewards:is_short", \
      2, 30.0
  rewards = reward_fns.rewards_of(cfg.to_dict())
  try:
    example = math_verifier.RewardExample(capability="math", question="q", answer="7",
                                          verifier="math")
    responses = ["\\boxed{7}", "77", "x", "\\boxed{8}"]
    examples = [example] * len(responses)
    for _ in range(2):  # the second step reuses the same workers
      total, per_fn, _ = rewards.score(responses, examples)
      assert len(_verifier_workers(os.getpid())) <= 2
    assert per_fn["has_seven"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert per_fn["is_short"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert per_fn["verifier"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert total.tolist() == [2.0, 2.0, 1.0, 0.0]
  finally:
    math_verifier.shared_pool(rewards.config).stop()


def _verifier_workers(parent: int) -> set[int]:
  """The live verifier worker processes of `parent` (their command line names the entry)."""
  out = set()
  for pid in _live_children(parent):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if math_verifier.MATH_WORKER_ENTRY.encode() in f.read():
          out.add(pid)
    except OSError:
      pass
  return out
