"""Settings of multi-process runs (the 2-process run itself is in tests/test_multiprocess.py)."""
import pytest

from copd_jax import distributed


def test_single_process_when_nothing_is_set():
  assert distributed.resolve_settings(None, None, None, environ={}) is None


def test_flags_take_precedence_over_environment():
  env = {distributed.ENV_COORDINATOR: "10.0.0.1:1", distributed.ENV_NUM_PROCESSES: "4",
         distributed.ENV_PROCESS_ID: "3"}
  s = distributed.resolve_settings("127.0.0.1:5000", 2, 1, environ=env)
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("127.0.0.1:5000", 2, 1)
  s = distributed.resolve_settings(None, None, None, environ=env)
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:1", 4, 3)


@pytest.mark.parametrize("address,count,index,match", [
    ("127.0.0.1:5000", None, 0, "num_processes"),
    ("127.0.0.1", 2, 0, "host:port"),
    ("127.0.0.1:5000", 2, 2, "process_id"),
    ("127.0.0.1:5000", 0, 0, "num_processes"),
    (None, 2, 1, "coordinator_address"),
    ("127.0.0.1:5000", "two", 0, "num_processes"),
])
def test_bad_settings_name_the_flag(address, count, index, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve_settings(address, count, index, environ={})
