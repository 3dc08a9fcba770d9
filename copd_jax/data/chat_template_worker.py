"""The chat-template render worker: templates render in one worker process per Python
process, killed at the deadline (render_chat_template), because a template can hang inside
one C call where no check of the sandbox (copd_jax.data.chat_template) runs.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from typing import Any, Mapping

from copd_jax.data.chat_template import (
    MAX_RENDER_CHARS, RENDER_TIME_LIMIT_S, ChatTemplateError, _LimitedSandbox,
    chat_template_environment, compile_chat_template, render_in_sandbox)

# ----------------------------------------------------------------- the render worker
#
# A template can hang inside one C call (json.dumps with a huge indent, a huge integer
# power) where no in-process check runs. So templates render in ONE worker process per
# Python process, reused across calls and tokenizers (requests are serialised by a
# lock): the parent waits for each answer until the deadline and kills the worker when
# it passes; the next render starts a fresh one. The worker dies with its parent
# (PR_SET_PDEATHSIG, plus a watch of the parent's pid), limits its own address space
# (RENDER_WORKER_HEADROOM_BYTES beyond what it holds after start-up, so an unforeseen
# way of building a huge string ends in MemoryError), and ignores SIGINT (the parent
# decides). Protocol, over the worker's stdin / stdout: frames of a 4-byte big-endian
# length and a payload; the parent sends pickle((source, variables, time_limit_s,
# max_chars)); the worker answers one status byte (b"+" text, b"!" error message) and
# UTF-8 text (surrogatepass: a message may hold any str), never a pickle.

RENDER_WORKER_HEADROOM_BYTES = 512 << 20
_WORKER_START_TIMEOUT_S = 120.0  # imports on a loaded machine; not the template's time
_KILL_GRACE_S = 0.25  # the worker's own deadline check usually answers first

_WORKER_BOOT = """
import os, signal, sys, threading, time
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
  try:
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
if os.getppid() != parent:
  os._exit(0)
def watch():
  while os.getppid() == parent:
    time.sleep(0.5)
  os._exit(0)
threading.Thread(target=watch, daemon=True).start()
signal.signal(signal.SIGINT, signal.SIG_IGN)
from copd_jax.data.chat_template_worker import serve_render_requests
serve_render_requests()
"""


def _write_frame(stream, payload: bytes) -> None:
  stream.write(len(payload).to_bytes(4, "big") + payload)
  stream.flush()


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
  """n bytes from fd; TimeoutError past `deadline` (monotonic), EOFError on end of file."""
  chunks, left = [], n
  while left:
    if deadline is not None:
      ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0.0))
      if not ready:
        raise TimeoutError
    chunk = os.read(fd, min(left, 1 << 20))
    if not chunk:
      raise EOFError
    chunks.append(chunk)
    left -= len(chunk)
  return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None) -> bytes:
  return _read_exact(fd, int.from_bytes(_read_exact(fd, 4, deadline), "big"), deadline)


def _limit_address_space(headroom: int) -> None:
  """This process may map `headroom` bytes beyond what it maps now (Linux; elsewhere a
  no-op): past it an allocation raises MemoryError instead of growing without bound."""
  try:
    import resource
    with open("/proc/self/statm") as f:
      in_use = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = in_use + headroom if hard == resource.RLIM_INFINITY else min(in_use + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
  except (ImportError, OSError, ValueError):
    pass


def serve_render_requests() -> None:
  """The render worker's loop (started by _RenderWorker with _WORKER_BOOT): renders the
  requests read from stdin until it closes. Keeps a few compiled templates."""
  requests = os.dup(0)
  replies = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)  # a stray print cannot corrupt the replies
  envs: dict[tuple, _LimitedSandbox] = {}
  compiled: dict[tuple, Any] = {}
  compile_chat_template(chat_template_environment(), "{{ x|tojson }}").render(x=1)  # imports
  _limit_address_space(RENDER_WORKER_HEADROOM_BYTES)
  _write_frame(replies, b"+ready")
  while True:
    try:
      source, variables, time_limit_s, max_chars = pickle.loads(_read_frame(requests, None))
    except EOFError:
      return
    key = (float(time_limit_s), int(max_chars))
    try:
      env = envs.get(key) or envs.setdefault(
          key, chat_template_environment(time_limit_s=key[0], max_chars=key[1]))
      template = compiled.get((source, key))
      if template is None:
        template = compile_chat_template(env, source)
        if len(compiled) >= 8:
          compiled.clear()
        compiled[(source, key)] = template
      reply = b"+" + render_in_sandbox(env, template, variables).encode("utf-8", "surrogatepass")
    except ChatTemplateError as err:
      reply = b"!" + str(err).encode("utf-8", "surrogatepass")
    except BaseException as err:  # noqa: B036 -- answer whatever happened, keep serving
      reply = b"!" + f"chat template failed ({type(err).__name__})".encode()
    _write_frame(replies, reply)


class _RenderWorker:
  """The parent's side of the render worker (see the comment above _WORKER_BOOT)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._process: subprocess.Popen | None = None
    self._owner = os.getpid()
    self._launcher = None
    self.starts = 0  # worker processes started by this process (tests, logs)

  @property
  def pid(self) -> int | None:
    """The live worker's pid, None when there is none."""
    process = self._process
    return process.pid if process is not None and process.poll() is None else None

  def _start(self) -> subprocess.Popen:
    # PR_SET_PDEATHSIG fires when the THREAD that started the worker ends, so the worker
    # is started from one long-lived launcher thread, not from the calling thread.
    if self._launcher is None:
      self._launcher = concurrent.futures.ThreadPoolExecutor(
          1, thread_name_prefix="chat-template-launcher")
    command = [sys.executable, "-c", _WORKER_BOOT, str(os.getpid())]
    env = dict(os.environ)  # the worker imports this very copy of copd_jax
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    spawn = functools.partial(subprocess.Popen, command, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, close_fds=True, env=env)
    try:
      process = self._launcher.submit(spawn).result()
    except RuntimeError:  # the interpreter is shutting down: no new threads
      process = spawn()
    self.starts += 1
    try:
      if _read_frame(process.stdout.fileno(), time.monotonic() + _WORKER_START_TIMEOUT_S) \
          != b"+ready":
        raise EOFError
    except (EOFError, TimeoutError, OSError):
      code = self._stop(process)
      raise ChatTemplateError(f"the chat-template render worker did not start (exit code "
                              f"{code}; see its messages above)") from None
    return process

  @staticmethod
  def _stop(process: subprocess.Popen) -> int | None:
    process.kill()
    for stream in (process.stdin, process.stdout):
      try:
        stream.close()
      except OSError:
        pass
    return process.wait()

  def close(self) -> None:
    """Ends the worker (the next render starts a new one)."""
    with self._lock:
      if self._process is not None and self._owner == os.getpid():
        self._stop(self._process)
      self._process = None

  def render(self, source: str, variables: Mapping[str, Any], *, time_limit_s: float,
             max_chars: int) -> str:
    try:
      request = pickle.dumps((source, dict(variables), time_limit_s, max_chars),
                             protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:  # noqa: BLE001 -- pickle raises several types
      raise ChatTemplateError(f"chat template variables must be plain data (str, numbers, "
                              f"lists, dicts): {type(err).__name__}: {err}") from None
    with self._lock:
      if self._owner != os.getpid():  # a forked child: the pipes are the parent's
        self._process, self._launcher, self._owner = None, None, os.getpid()
      if self._process is None or self._process.poll() is not None:
        self._process = self._start()
      process = self._process
      deadline = time.monotonic() + time_limit_s + _KILL_GRACE_S
      try:
        _write_frame(process.stdin, request)
        reply = _read_frame(process.stdout.fileno(), deadline)
      except TimeoutError:
        self._stop(process)
        self._process = None
        raise ChatTemplateError(f"chat template render took longer than {time_limit_s:g} s "
                                "(the render worker was stopped)") from None
      except (EOFError, OSError):
        code = self._stop(process)
        self._process = None
        raise ChatTemplateError(f"the chat-template render worker died (exit code {code}; "
                                "the template made it crash or exceed its memory)") from None
      except BaseException:  # e.g. KeyboardInterrupt mid-exchange: its reply would be stale
        self._stop(process)
        self._process = None
        raise
    text = reply[1:].decode("utf-8", "surrogatepass")
    if reply[:1] != b"+":
      raise ChatTemplateError(text)
    return text


_RENDER_WORKER = _RenderWorker()
atexit.register(_RENDER_WORKER.close)


def render_chat_template(source: str, variables: Mapping[str, Any], *,
                         time_limit_s: float = RENDER_TIME_LIMIT_S,
                         max_chars: int = MAX_RENDER_CHARS) -> str:
  """The template source rendered with variables in the sandbox, in the render worker:
  ChatTemplateError when it fails, builds more than max_chars, or runs past time_limit_s
  (the worker is then killed). variables must pickle (plain data)."""
  return _RENDER_WORKER.render(source, variables, time_limit_s=time_limit_s,
                               max_chars=max_chars)
