"""One writer per run directory (issue 30, item 3).

Found on main: two identical commands on one workdir both exited 0, leaving metrics.jsonl
with 21 rows in a scrambled step order; two methods warm-starting one
warm_start.checkpoint_dir at once died in orbax with a raw FileExistsError; `--dry_run`
passed when the workdir was a regular file. Now the workdir and a warm-start directory
being written are held with an exclusive flock; a second process gets an error naming
the holder's pid, and a lock left by a dead process is taken over."""
import os
import subprocess
import sys
import time

import pytest

import paths
from copd_jax.config_lib import spec_of
from copd_jax import default_config, main, policy_setup, run_dir, warm_start

REPO = paths.REPO


def python(*args, **kwargs) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for(path: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f"the first run ended before locking: {proc.stdout.read()}")
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.2)


def test_a_second_run_on_the_same_workdir_exits_1_naming_the_lock_and_its_pid(tmp_path):
  workdir = str(tmp_path / "run")
  command = ["-m", "copd_jax.main", "--config=configs/copd.py:micro",
             f"--config.workdir={workdir}",
             f"--config.warm_start.checkpoint_dir={tmp_path / 'base'}"]
  first = python(*command)
  try:
    wait_for(os.path.join(workdir, run_dir.LOCK_FILE), first)
    second = python(*command)
    out, _ = second.communicate(timeout=120)  # about 3 s unloaded (imports only)
    assert second.returncode == 1, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    assert f"pid {first.pid}" in lines[0] and run_dir.LOCK_FILE in lines[0], lines[0]
    assert first.poll() is None  # the first run was not disturbed
  finally:
    first.kill()
    first.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
  holder = python("-c", "import os, sys; from copd_jax import run_dir; "
                  f"run_dir.DirectoryLock({str(tmp_path)!r}).acquire(); "
                  "print(os.getpid(), flush=True); os._exit(0)")  # dies holding it
  dead_pid = int(holder.communicate(timeout=120)[0].split()[-1])
  lock_file = tmp_path / run_dir.LOCK_FILE
  assert lock_file.read_text().strip() == str(dead_pid)  # left behind, naming the dead pid
  with run_dir.DirectoryLock(str(tmp_path)):
    assert lock_file.read_text().strip() == str(os.getpid())
  assert not lock_file.exists()  # released: removed


def test_a_held_lock_is_an_error_naming_the_holder_in_process(tmp_path):
  with run_dir.DirectoryLock(str(tmp_path)):
    with pytest.raises(run_dir.DirectoryLockedError, match=rf"pid {os.getpid()} holds"):
      run_dir.DirectoryLock(str(tmp_path)).acquire()
  with run_dir.DirectoryLock(str(tmp_path)):  # released: free again
    pass


def test_a_warm_start_directory_being_written_is_locked(tmp_path):
  """A second method warm-starting the same checkpoint_dir while the first trains it
  gets a named error instead of orbax's FileExistsError mid-save."""
  cfg = default_config.get("copd", "micro")
  cfg.workdir = str(tmp_path / "run")
  cfg.warm_start.checkpoint_dir = str(tmp_path / "base")
  setup = policy_setup.build_setup(spec_of(cfg))
  with run_dir.DirectoryLock(cfg.warm_start.checkpoint_dir, "warm-start directory"):
    with pytest.raises(run_dir.DirectoryLockedError,
                       match=rf"warm-start directory .*base is in use .*pid {os.getpid()}"):
      warm_start.get_base_policy(spec_of(cfg), setup)
  assert not os.path.exists(os.path.join(cfg.warm_start.checkpoint_dir, "metadata.json"))


@pytest.mark.parametrize("field", ["workdir", "warm_start.checkpoint_dir"])
def test_a_directory_field_that_is_a_regular_file_fails_the_dry_run(tmp_path, field):
  cfg = default_config.get("copd", "micro")
  cfg.workdir = str(tmp_path / "run")
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  default_config.set_field(cfg, field, str(path))
  with pytest.raises(NotADirectoryError, match=rf"config\.{field} must be a directory"):
    main.dry_run(cfg)
