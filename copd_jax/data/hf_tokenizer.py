"""A Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json) as our Tokenizer.

Encoding and decoding go through the `tokenizers` library (no transformers); the chat
template is rendered with Jinja in a sandbox, with the settings transformers uses
(ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, `tojson`,
`raise_exception`, `strftime_now`), so a template renders to the same text. Template text
comes from chat_template.jinja when present (newer transformers save it there), else from
tokenizer_config.json's `chat_template` (a string, or a list of {name, template} of
which "default" is used). The template is data: it runs sandboxed, never as Python, in a
render worker process that is killed at the deadline (render_chat_template), with every
string, list and integer it builds capped at MAX_RENDER_CHARS characters / items
(MAX_RENDER_INT_BITS bits).

Special ids, for Qwen-style tokenizers
--------------------------------------
eos_id: the token that ends a model's response. With a chat template and `<|im_end|>` in
  the vocabulary it is `<|im_end|>` (a chat turn ends there, for base and instruct models
  alike, since our prompts are always chat-rendered); otherwise tokenizer_config's
  `eos_token`. `eos_token=` overrides. decode() also stops at the config's eos_token and
  at `<|endoftext|>`.
pad_id: tokenizer_config's `pad_token` (Qwen: `<|endoftext|>`), else the eos token.
bos_id: Qwen has no BOS (`bos_token` is null). Then bos_id = pad_id: code that filters
  specials treats it as padding, and nothing should prepend it (prompts come from
  `prompt_token_ids`, which follows the chat template and adds no BOS).
image_id: `<|image_pad|>` (the placeholder a vision embedding replaces), -1 if absent.
vocab_size: max(token id) + 1 of the tokenizer, or the model's embedding rows when
  given and larger (released Qwen3 pads its embedding to 151936 rows).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import datetime
import functools
import inspect
import itertools
import json
import os
import pickle
import re
import select
import subprocess
import sys
import threading
import time
import types
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.sandbox
import jinja2.utils
import markupsafe
import tokenizers

from copd_jax.data.tokenizer import REPLACEMENT_CHAR

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


class ChatTemplateError(ValueError):
  """The chat template rejected its input (its `raise_exception(...)`) or failed to render."""


def _raise_exception(message):
  raise ChatTemplateError(f"chat template: {message}")


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


# Limits of one chat-template render: a template is a program (loops, macros, string
# arithmetic), so one that loops, recurses or builds huge strings must fail with a
# ChatTemplateError rather than hang, exhaust memory or abort the process.
RENDER_TIME_LIMIT_S = 5.0     # default of HFTokenizer(render_time_limit_s=...)
MAX_RENDER_CHARS = 1 << 22    # output, and any string or list the template builds
MAX_RENDER_INT_BITS = 1 << 16  # integers (about 19700 digits; str() stops at 4300 anyway)


def _text_size(value, budget: int) -> int:
  """About len(str(value)) -- exact for a str, a lower bound plus punctuation for lists,
  tuples and dicts (their items' sizes) -- counting stops once past `budget`, so a list
  holding one huge string a million times costs nothing to measure."""
  if isinstance(value, str):
    return len(value)
  total, pending = 0, [iter((value,))]
  while pending and total <= budget:
    item = next(pending[-1], _text_size)
    if item is _text_size:
      pending.pop()
    elif isinstance(item, (str, bytes)):
      total += len(item) + 2
    elif isinstance(item, (list, tuple, set, frozenset)):
      total += 2
      pending.append(iter(item))
    elif isinstance(item, Mapping):
      total += 2
      pending.append(itertools.chain.from_iterable(item.items()))
    elif isinstance(item, int) and not isinstance(item, bool):
      total += item.bit_length() // 3 + 2
    else:
      total += 8
  return total


_SIZED = (str, bytes, list, tuple)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_size(size: int, max_chars: int) -> None:
  if size > max_chars:
    raise ChatTemplateError(f"chat template builds a sequence of about {size} items "
                            f"(limit {max_chars})")


def _check_int_bits(bits: int, what: str) -> None:
  if bits > MAX_RENDER_INT_BITS:
    raise ChatTemplateError(f"chat template computes a {what} of about {bits} bits "
                            f"(limit {MAX_RENDER_INT_BITS})")


# One printf-style conversion: %[(name)][flags][width][.precision][length]type
_PERCENT_SPEC = re.compile(r"%(\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+)?)?[hlL]?(.)", re.S)


def _percent_format_size(fmt, args, max_chars: int) -> int:
  """About len(fmt % args) without building it: the format's own text, plus per
  conversion its width and precision (a `*` takes them from args), plus the args' text."""
  positional = list(args) if isinstance(args, tuple) else [args]
  size, next_arg = len(fmt), 0
  fmt_text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
  for match in _PERCENT_SPEC.finditer(fmt_text):
    if match.group(4) == "%":
      continue
    for number in (match.group(2), match.group(3)):
      if number == "*":
        star = positional[next_arg] if next_arg < len(positional) else 0
        next_arg += 1
        number = star if isinstance(star, int) else 0
      size += abs(int(number or 0))
    next_arg += match.group(1) is None
  return size + _text_size(args, max_chars)


def _format_spec_width(spec: str) -> int:
  """The largest number in a str.format spec ('>1000000000', '.3f', '0{n}' resolved)."""
  return max((int(d) for d in re.findall(r"\d+", spec)), default=0) if spec else 0


class _SizeLimitedFormatter(jinja2.sandbox.SandboxedFormatter):
  """str.format / format_map in the sandbox, refusing a field wider than the limit and
  stopping once the fields written so far exceed it."""

  def __init__(self, env, **kwargs):
    super().__init__(env, **kwargs)
    self._written = 0

  def format_field(self, value, format_spec):
    max_chars = self._env.max_chars
    _check_size(_format_spec_width(format_spec), max_chars)
    _check_size(self._written + _text_size(value, max_chars), max_chars)
    text = super().format_field(value, format_spec)
    self._written += len(text)
    _check_size(self._written, max_chars)
    return text


class _SizeLimitedEscapeFormatter(_SizeLimitedFormatter, markupsafe.EscapeFormatter):
  pass


def _str_method_size(method, args, kwargs, max_chars: int) -> int | None:
  """About the length of the result of a str (or bytes) method that can grow its input,
  before it runs (None: a method that cannot, or arguments it will reject anyway)."""
  text, name = method.__self__, method.__name__
  if name in ("center", "ljust", "rjust", "zfill"):
    width = args[0] if args else kwargs.get("width", 0)
    return width if isinstance(width, int) else None
  if name == "expandtabs":
    tabsize = args[0] if args else kwargs.get("tabsize", 8)
    if not isinstance(tabsize, int):
      return None
    tabs = text.count(b"\t" if isinstance(text, bytes) else "\t")
    return len(text) + max(tabsize, 0) * (tabs + 1)
  if name == "replace" and len(args) >= 2 and isinstance(args[0], type(text)):
    old, new = args[0], args[1]
    count = args[2] if len(args) > 2 else kwargs.get("count", -1)
    hits = text.count(old) + (1 if not old else 0)
    if isinstance(count, int) and count >= 0:
      hits = min(hits, count)
    return len(text) + hits * max(_text_size(new, max_chars) - len(old), 0)
  if name == "translate" and args and isinstance(args[0], Mapping):
    widest = max((_text_size(v, max_chars) for v in args[0].values()), default=1)
    return len(text) * max(widest, 1)
  return None


class _CheckedConcatCodeGenerator(jinja2.compiler.CodeGenerator):
  """Compiles `a ~ b` to environment.checked_concat((a, b)), which measures before it
  joins (jinja's own str_join cannot be intercepted)."""

  def visit_Concat(self, node, frame):
    if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
      return super().visit_Concat(node, frame)
    self.write("environment.checked_concat((")
    for arg in node.nodes:
      self.visit(arg, frame)
      self.write(", ")
    self.write("))")


class _LimitedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
  """transformers' sandbox plus a deadline and size limits.

  Size: every operation that can build a long string, list or integer is measured
  BEFORE it runs -- `*`, `+`, `**`, `%` (printf), `~`, str.format / format_map, the
  str methods center / ljust / rjust / zfill / expandtabs / replace / join / translate,
  the filters that pad, join, repeat or serialise (center, indent, wordwrap, format,
  join, replace, tojson, string, pprint, batch, slice, truncate, sum), lipsum, and each
  `{{ }}` value -- and any call's or filter's result is measured after. Time: the
  deadline is checked at every call, attribute / item access and operator; a single
  slow C call is ended by the render worker's kill (see render_chat_template).
  """

  intercepted_binops = frozenset(["*", "**", "+", "%"])
  code_generator_class = _CheckedConcatCodeGenerator
  deadline = float("inf")
  time_limit_s = RENDER_TIME_LIMIT_S
  max_chars = MAX_RENDER_CHARS

  def check_time(self):
    if time.monotonic() > self.deadline:
      raise ChatTemplateError(f"chat template render took longer than "
                              f"{self.time_limit_s:g} s (a loop or recursion?)")

  def check_result(self, value):
    if isinstance(value, (str, bytes, list, tuple)):
      _check_size(len(value), self.max_chars)
    elif isinstance(value, int) and not isinstance(value, bool):
      _check_int_bits(value.bit_length(), "number")
    return value

  def call(self, __context, __obj, *args, **kwargs):
    self.check_time()
    if (isinstance(__obj, types.BuiltinMethodType)
        and isinstance(getattr(__obj, "__self__", None), (str, bytes))):
      if __obj.__name__ == "join" and args:  # measure the items, then join them
        items = list(args[0])
        _check_size(sum(_text_size(i, self.max_chars) for i in items)
                    + len(__obj.__self__) * len(items), self.max_chars)
        args = (items,) + args[1:]
      size = _str_method_size(__obj, args, kwargs, self.max_chars)
      if size is not None:
        _check_size(size, self.max_chars)
    return self.check_result(super().call(__context, __obj, *args, **kwargs))

  def getattr(self, obj, attribute):
    self.check_time()
    return super().getattr(obj, attribute)

  def getitem(self, obj, argument):
    self.check_time()
    return super().getitem(obj, argument)

  def call_binop(self, context, operator, left, right):
    self.check_time()
    if operator == "+":
      if isinstance(left, _SIZED) and isinstance(right, _SIZED):
        _check_size(len(left) + len(right), self.max_chars)
    elif operator == "*":
      if isinstance(left, _SIZED) or isinstance(right, _SIZED):
        seq, n = (left, right) if isinstance(left, _SIZED) else (right, left)
        if _is_int(n):
          _check_size(len(seq) * max(n, 0), self.max_chars)
      elif _is_int(left) and _is_int(right):
        _check_int_bits(left.bit_length() + right.bit_length(), "product")
    elif operator == "**":
      if _is_int(left) and _is_int(right) and abs(left) > 1:
        _check_int_bits(max(left.bit_length() - 1, 1) * max(right, 0), "power")
    elif operator == "%" and isinstance(left, (str, bytes)):
      _check_size(_percent_format_size(left, right, self.max_chars), self.max_chars)
    return self.check_result(self.binop_table[operator](left, right))

  def wrap_str_format(self, value):
    """jinja's sandboxed str.format / format_map, with the size-limited formatter."""
    if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or \
        value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
      return None
    text = value.__self__
    is_format_map = value.__name__ == "format_map"

    def wrapper(*args, **kwargs):
      if is_format_map:
        if kwargs or len(args) != 1:
          raise TypeError("format_map() takes exactly one positional argument")
        args, kwargs = (), args[0]
      formatter = (_SizeLimitedEscapeFormatter(self, escape=text.escape)  # counts one call
                   if isinstance(text, markupsafe.Markup) else _SizeLimitedFormatter(self))
      return type(text)(formatter.vformat(text, args, kwargs))

    return functools.update_wrapper(wrapper, value)

  def checked_concat(self, parts):
    """`a ~ b ~ ...`: str() of each part, joined, measured first."""
    _check_size(sum(_text_size(p, self.max_chars) for p in parts), self.max_chars)
    return "".join(str(p) for p in parts)

  def checked_output(self, value):
    """finalize: each `{{ value }}` is measured before it is converted to text."""
    _check_size(_text_size(value, self.max_chars), self.max_chars)
    return value


# Filters that build text or lists longer than their input: name -> the size of the
# result, from the filtered value and the filter's other arguments (by name), before it
# runs.
def _lines(s) -> int:
  return str(s).count("\n") + 1


def _width(value, default: int) -> int:
  return value if isinstance(value, int) else len(str(value)) if value is not None else default


_FILTER_SIZES = {
    "center": lambda v, a, m: _width(a.get("width"), 80),
    "indent": lambda v, a, m: _text_size(v, m) + _lines(v) * _width(a.get("width"), 4),
    "wordwrap": lambda v, a, m: _text_size(v, m) * (1 + len(str(a.get("wrapstring") or "\n")))
    // max(_width(a.get("width"), 79), 1) + _text_size(v, m) + _lines(v),
    "format": lambda v, a, m: _percent_format_size(str(v), tuple(a.get("args", ())) or
                                                   dict(a.get("kwargs", {})), m),
    "join": lambda v, a, m: _text_size(v, m) + len(str(a.get("d", ""))) * len(v),
    "replace": lambda v, a, m: _str_method_size(
        str(v).replace, (str(a.get("old", "")), a.get("new", ""), a.get("count") or -1), {}, m),
    "string": lambda v, a, m: _text_size(v, m),
    "pprint": lambda v, a, m: 2 * _text_size(v, m),
    "batch": lambda v, a, m: _width(a.get("linecount"), 0),
    "slice": lambda v, a, m: _width(a.get("slices"), 0),
    "truncate": lambda v, a, m: _text_size(v, m) + len(str(a.get("end", "..."))),
    "sum": lambda v, a, m: sum(len(x) for x in itertools.chain(v, [a.get("start")])
                               if isinstance(x, _SIZED)),  # lists or tuples summed
    "urlize": lambda v, a, m: _text_size(v, m) * (2 + len(str(a.get("target") or ""))
                                                  + len(str(a.get("rel") or ""))),
}
_CONTEXT_PARAMS = ("eval_ctx", "environment", "env", "context")


def _size_limited_filter(env: _LimitedSandbox, name: str, original):
  """A filter that is measured before it runs (_FILTER_SIZES) and its result after."""
  estimate = _FILTER_SIZES.get(name)
  signature = None
  if estimate is not None:  # the filter's parameters after the context jinja passes
    params = list(inspect.signature(original).parameters.values())
    if params and params[0].name in _CONTEXT_PARAMS:
      params = params[1:]
    signature = inspect.Signature(params)
  passes_context = getattr(original, "jinja_pass_arg", None) is not None

  @functools.wraps(original)  # keeps jinja's pass_eval_context / pass_environment marks
  def limited(*args, **kwargs):
    env.check_time()
    if signature is not None:
      context, args = (args[:1], args[1:]) if passes_context else ((), args)
      bound = signature.bind(*args, **kwargs)
      value = bound.args[0] if bound.args else None
      if name in ("join", "sum") and not isinstance(value, (list, tuple)):
        value = list(value)  # a generator can be read once: measure, then join the list
        bound = signature.bind(value, *bound.args[1:], **bound.kwargs)
      size = estimate(value, bound.arguments, env.max_chars)
      if isinstance(size, int):
        _check_size(size, env.max_chars)
      args, kwargs = context + tuple(bound.args), bound.kwargs
    return env.check_result(original(*args, **kwargs))

  return limited


def _tojson_filter(env: _LimitedSandbox):
  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson, streamed so that output past the limit stops it early."""
    if not (indent is None or isinstance(indent, str) or
            (isinstance(indent, int) and not isinstance(indent, bool))):
      raise ChatTemplateError(f"tojson: indent must be an integer or a string, got {indent!r}")
    if isinstance(indent, int):
      indent = min(max(indent, 0), env.max_chars + 1)
    _check_size(_text_size(value, env.max_chars)
                + _text_size(indent or "", env.max_chars) + _text_size(separators, env.max_chars),
                env.max_chars)
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                               sort_keys=sort_keys)
    chunks, size = [], 0
    for chunk in encoder.iterencode(value):  # a generator when indent is set
      size += len(chunk)
      _check_size(size, env.max_chars)
      env.check_time()
      chunks.append(chunk)
    return "".join(chunks)
  return tojson


def _lipsum_global(env: _LimitedSandbox):
  original = jinja2.utils.generate_lorem_ipsum

  def lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 (jinja's names)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, min, max)):
      raise ChatTemplateError(f"lipsum: n, min and max must be integers, got {n!r}, {min!r}, "
                              f"{max!r}")
    if n > 0 and max > 0:  # words of at most 15 letters and a space
      _check_size(n * max * 16, env.max_chars)
    return original(n=n, html=html, min=min, max=max)
  return lipsum


def chat_template_environment(*, time_limit_s: float = RENDER_TIME_LIMIT_S,
                              max_chars: int = MAX_RENDER_CHARS) -> _LimitedSandbox:
  """The sandboxed Jinja environment chat templates run in: transformers' settings
  (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, tojson,
  raise_exception, strftime_now) plus _LimitedSandbox's limits. In-process it checks the
  deadline only between operations; render_chat_template runs it in a worker that is
  killed at the deadline."""
  env = _LimitedSandbox(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
      undefined=jinja2.Undefined)
  env.finalize = env.checked_output
  env.time_limit_s = float(time_limit_s)
  env.max_chars = int(max_chars)
  for name, original in list(env.filters.items()):
    env.filters[name] = _size_limited_filter(env, name, original)
  env.filters["tojson"] = _tojson_filter(env)
  env.globals["lipsum"] = _lipsum_global(env)
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env


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
from copd_jax.data.hf_tokenizer import serve_render_requests
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


def compile_chat_template(env: _LimitedSandbox, source: str):
  """source -> jinja2.Template of env; any failure (TemplateSyntaxError, RecursionError for
  deep nesting, IndentationError for too many nested blocks, ...) is a ChatTemplateError."""
  env.deadline = time.monotonic() + env.time_limit_s  # constant folding may call filters
  try:
    return env.from_string(source)
  except Exception as err:  # noqa: BLE001 -- every kind of compile failure is one error
    raise ChatTemplateError(f"chat template does not compile ({type(err).__name__}: "
                            f"{str(err)[:300]})") from None
  finally:
    env.deadline = float("inf")


def render_in_sandbox(env: _LimitedSandbox, template, variables: Mapping[str, Any]) -> str:
  """One render of a compiled template of env, with env's limits (the deadline starts
  here); any failure is a ChatTemplateError."""
  env.deadline = time.monotonic() + env.time_limit_s
  try:
    chunks, size = [], 0
    for chunk in template.generate(**variables):
      size += len(chunk)
      if size > env.max_chars:
        raise ChatTemplateError(f"chat template output exceeds {env.max_chars} characters")
      env.check_time()
      chunks.append(chunk)
    return "".join(chunks)
  except ChatTemplateError:
    raise
  except RecursionError:
    raise ChatTemplateError("chat template recursed too deeply") from None
  except MemoryError:
    raise ChatTemplateError("chat template ran out of memory (it builds something too "
                            "large)") from None
  except Exception as err:  # TemplateError (incl. SecurityError), TypeError, ...: one type
    raise ChatTemplateError(f"chat template failed ({type(err).__name__}: "
                            f"{str(err)[:300]})") from None
  finally:
    env.deadline = float("inf")


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


def _token_text(value) -> str | None:
  """tokenizer_config.json writes a special token as a string or {"content": ...}."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"special token entry {value!r} is neither a string nor {{'content': ...}}")


def _read_text(path: str) -> str:
  """A UTF-8 file's text; ValueError naming the file and the first bad byte."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as err:
    raise ValueError(f"{path}: not UTF-8 (byte {data[err.start]:#04x} at offset "
                     f"{err.start})") from None


def _read_tokenizer_config(path: str) -> dict:
  """tokenizer_config.json as a dict; every way it can be malformed is a ValueError
  naming the file (not UTF-8, not JSON, nested too deeply, a number too long to
  convert, not an object)."""
  text = _read_text(path)
  try:
    config = json.loads(text)
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column "
                     f"{err.colno})") from None
  except RecursionError:
    raise ValueError(f"{path}: JSON nested too deeply") from None
  except ValueError as err:  # e.g. an integer of more than 4300 digits
    raise ValueError(f"{path}: unreadable JSON value ({err})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: must hold a JSON object, got {type(config).__name__}")
  return config


def _check_encodable(text: str, what: str) -> None:
  """A lone UTF-16 surrogate ('\\ud800', e.g. from a JSON escape) cannot be encoded as
  UTF-8, so no tokenizer can take it: ValueError naming the position."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as err:
    raise ValueError(f"{what} holds an invalid character {text[err.start]!r} at position "
                     f"{err.start} (a lone UTF-16 surrogate), which cannot be "
                     "tokenized") from None


def _read_chat_template(directory: str, config: Mapping) -> str | None:
  path = os.path.join(directory, CHAT_TEMPLATE_FILE)
  if os.path.isfile(path):
    return _read_text(path)
  template = config.get("chat_template")
  if template is None or isinstance(template, str):
    return template
  if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    if isinstance(named.get("default"), str):
      return named["default"]
  raise ValueError(f"{os.path.join(directory, TOKENIZER_CONFIG_FILE)}: 'chat_template' must be "
                   "a string or a list holding a template named 'default'")


class HFTokenizer:
  """Implements copd_jax.data.tokenizer.Tokenizer for a HF tokenizer directory (see module doc).

  directory: holds tokenizer.json (required) and tokenizer_config.json (optional, for
    special tokens and the chat template).
  model_vocab_size: the model's embedding rows; vocab_size is the larger of it and the
    tokenizer's.
  eos_token: overrides the response-ending token (default: see the module docstring).
  chat_template_kwargs: extra template variables for every render (e.g. Qwen3's
    enable_thinking=False).
  render_time_limit_s: the deadline of one chat-template render (see render_chat).
  system_prompt: a system message rendered before every prompt ('' = none).
  """

  def __init__(self, directory: str, *, model_vocab_size: int | None = None,
               eos_token: str | None = None,
               chat_template_kwargs: Mapping[str, Any] | None = None,
               render_time_limit_s: float = RENDER_TIME_LIMIT_S,
               system_prompt: str = ""):
    self.directory = directory
    self.system_prompt = system_prompt
    if isinstance(render_time_limit_s, bool) or not isinstance(render_time_limit_s, (int, float)) \
        or not 0 < render_time_limit_s < float("inf"):
      raise ValueError(f"render_time_limit_s must be a positive number of seconds, got "
                       f"{render_time_limit_s!r}")
    self.render_time_limit_s = float(render_time_limit_s)
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no tokenizer.json in the tokenizer directory")
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
      raise ValueError(f"{path}: cannot load tokenizer ({err})") from err
    config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    config: dict = {}
    if os.path.isfile(config_path):
      config = _read_tokenizer_config(config_path)
    self._template_source = _read_chat_template(directory, config)
    self._template_kwargs = dict(chat_template_kwargs or {})
    try:
      self._special_token_text = {
          name: _token_text(config.get(name))
          for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    except ValueError as err:
      raise ValueError(f"{config_path}: {err}") from None

    vocab = self._tok.get_vocab(with_added_tokens=True)
    self._tokenizer_vocab_size = max(vocab.values()) + 1
    if model_vocab_size is not None and model_vocab_size < self._tokenizer_vocab_size:
      raise ValueError(f"model_vocab_size={model_vocab_size} is smaller than the tokenizer's "
                       f"vocabulary ({self._tokenizer_vocab_size} ids) in {path}")
    self._vocab_size = max(self._tokenizer_vocab_size, model_vocab_size or 0)

    config_eos = self._special_token_text["eos_token"]
    if eos_token is None:
      eos_token = IM_END if (self._template_source and IM_END in vocab) else config_eos
    self._eos_id = self._required_id(eos_token, "eos_token")
    pad_text = self._special_token_text["pad_token"] or eos_token
    self._pad_id = self._required_id(pad_text, "pad_token")
    bos_text = self._special_token_text["bos_token"]
    self._bos_id = self._required_id(bos_text, "bos_token") if bos_text else self._pad_id
    self._image_id = vocab.get(IMAGE_PAD, -1)
    self._stop_ids = frozenset(
        i for i in (self._eos_id, vocab.get(config_eos or ""), vocab.get(END_OF_TEXT))
        if i is not None)
    self._special_ids = frozenset(
        i for i, added in self._tok.get_added_tokens_decoder().items() if added.special)

  def _required_id(self, text: str | None, what: str) -> int:
    token = None if text is None else self._tok.token_to_id(text)
    if token is None:
      raise ValueError(f"{self.directory}: {what} {text!r} is not in the tokenizer's vocabulary")
    return token

  # ------------------------------------------------------------------ Tokenizer protocol

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def image_id(self) -> int:
    return self._image_id

  @property
  def stop_ids(self) -> frozenset[int]:
    """Ids at which decode() stops: eos_id, the config's eos_token and <|endoftext|>."""
    return self._stop_ids

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def encode(self, text: str) -> list[int]:
    """text -> ids, no specials added. Special-token text inside `text` (e.g. "<|im_end|>")
    becomes that special token, as in transformers; callers that must not allow this
    should reject such text first."""
    if not isinstance(text, str):
      raise TypeError(f"HFTokenizer.encode expects a str, got {type(text).__name__}")
    _check_encodable(text, "text to encode")
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int]) -> str:
    """ids -> text up to the first stop id (see stop_ids), without special tokens.

    Never raises on ids: a value that is not an int, or an id outside the tokenizer's
    vocabulary (e.g. an embedding row past it), becomes REPLACEMENT_CHAR.
    """
    pieces: list[str] = []
    run: list[int] = []

    def flush():
      if run:
        pieces.append(self._tok.decode(run, skip_special_tokens=True))
        run.clear()

    for raw in ids:
      try:
        token = int(raw)
      except (TypeError, ValueError, OverflowError):
        token = -1
      if token in self._stop_ids:
        break
      if token in self._special_ids:
        continue
      if 0 <= token < self._tokenizer_vocab_size and self._tok.id_to_token(token) is not None:
        run.append(token)
      else:
        flush()
        pieces.append(REPLACEMENT_CHAR)
    flush()
    return "".join(pieces)

  # ------------------------------------------------------------------ chat

  @property
  def has_chat_template(self) -> bool:
    return self._template_source is not None

  def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                  **template_kwargs) -> str:
    """The chat template applied to messages ([{"role": ..., "content": ...}, ...]) -> text.

    Template variables: messages, add_generation_prompt, the special tokens' text
    (bos_token, eos_token, pad_token, unk_token), the constructor's chat_template_kwargs
    and **template_kwargs (these win; plain data). The template runs sandboxed in the
    render worker (render_chat_template): at most render_time_limit_s seconds and
    MAX_RENDER_CHARS characters for any string it builds. Every failure, compile errors
    included, raises ChatTemplateError naming the tokenizer directory.
    """
    if self._template_source is None:
      raise ValueError(f"{self.directory}: no chat template (neither {CHAT_TEMPLATE_FILE} nor "
                       f"'chat_template' in {TOKENIZER_CONFIG_FILE})")
    variables = {k: v for k, v in self._special_token_text.items() if v is not None}
    variables.update(self._template_kwargs)
    variables.update(template_kwargs)
    variables.update(messages=[dict(m) for m in messages],
                     add_generation_prompt=add_generation_prompt)
    try:
      return render_chat_template(self._template_source, variables,
                                  time_limit_s=self.render_time_limit_s)
    except ChatTemplateError as err:
      raise ChatTemplateError(f"{self.directory}: {err}") from None

  def chat_messages(self, content: str) -> list[dict]:
    """One user turn, after the system message when system_prompt is set."""
    system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
    return system + [{"role": "user", "content": content}]

  def vision_placeholder_text(self, num_vision_tokens: int) -> str:
    """"<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" ("" when n == 0)."""
    if num_vision_tokens < 0:
      raise ValueError(f"num_vision_tokens must be >= 0, got {num_vision_tokens}")
    if num_vision_tokens == 0:
      return ""
    for token in (VISION_START, IMAGE_PAD, VISION_END):
      self._required_id(token, "vision token")
    return VISION_START + IMAGE_PAD * num_vision_tokens + VISION_END

  def prompt_token_ids(self, question: str, num_vision_tokens: int = 0) -> list[int]:
    """A single user turn, chat-rendered with the generation prompt, as ids.

    With num_vision_tokens = n > 0 the user content is <|vision_start|>, n x <|image_pad|>,
    <|vision_end|>, then the question (Qwen-VL's layout for one image or clip).
    """
    if not isinstance(question, str):
      raise TypeError(f"question must be a str, got {type(question).__name__}")
    _check_encodable(question, "the question")
    content = self.vision_placeholder_text(num_vision_tokens) + question
    text = self.render_chat(self.chat_messages(content), add_generation_prompt=True)
    ids = self.encode(text)
    if num_vision_tokens and ids.count(self._image_id) != num_vision_tokens:
      raise ValueError(f"prompt has {ids.count(self._image_id)} {IMAGE_PAD} tokens after "
                       f"rendering, expected {num_vision_tokens} (does the question or the "
                       "template contain the placeholder text?)")
    return ids
