"""Process checks shared by the worker-lifetime tests (Linux: reads /proc)."""
import os
import signal
import time


def alive(pid: int) -> bool:
  """Whether process pid exists and has not ended (a zombie has ended)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
  except (FileNotFoundError, ProcessLookupError):
    return False


def outlives(pid: int, seconds: float) -> bool:
  """Waits up to `seconds` for pid to end; True (and the process is SIGKILLed, so a failing
  test leaves nothing behind) when it is still alive then."""
  deadline = time.monotonic() + seconds
  while alive(pid) and time.monotonic() < deadline:
    time.sleep(0.05)
  if alive(pid):
    os.kill(pid, signal.SIGKILL)
    return True
  return False
