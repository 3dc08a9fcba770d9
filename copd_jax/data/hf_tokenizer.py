"""A Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json) as our Tokenizer.

Encoding and decoding go through the `tokenizers` library (no transformers). Template text
comes from chat_template.jinja when present (newer transformers save it there), else from
tokenizer_config.json's `chat_template` (a string, or a list of {name, template} of
which "default" is used). The template is data: it renders in the sandbox of
copd_jax.data.chat_template (transformers' Jinja settings, so the same text), in a render
worker process killed at the deadline (copd_jax.data.chat_template_worker), with every
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

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import tokenizers

from copd_jax.data.chat_template import RENDER_TIME_LIMIT_S, ChatTemplateError
from copd_jax.data.chat_template_worker import render_chat_template
from copd_jax.data.tokenizer import REPLACEMENT_CHAR

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


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
