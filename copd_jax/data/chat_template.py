"""The sandbox that chat templates render in.

A chat template is data: it runs with Jinja in a sandbox, never as Python, with the
settings transformers uses (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loopcontrols, `tojson`, `raise_exception`, `strftime_now`), so a template renders to the
same text; every string, list and integer it builds is capped at MAX_RENDER_CHARS
characters / items (MAX_RENDER_INT_BITS bits), and every failure is a ChatTemplateError.
render_chat_template (copd_jax.data.chat_template_worker) runs it in a render worker
process that is killed at the deadline.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import itertools
import json
import re
import time
import types
from typing import Any, Mapping

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.sandbox
import jinja2.utils
import markupsafe

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
