"""Tokenizers: the interface the rest of the code uses, and the built-in toy one.

Everything downstream (task batching, the sampler's stop tokens, evaluation) talks to a
`Tokenizer`; `ToyTokenizer` is a character-level implementation for the procedural
task suite. A wrapper around a HF `tokenizers` JSON file can implement the same
protocol later (its <img> placeholder would be the model's image/video pad token).
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

# decode() writes this for ids it cannot map to text (<unk>, out of range, not an int).
REPLACEMENT_CHAR = "\ufffd"


@runtime_checkable
class Tokenizer(Protocol):
  """What the library needs from a tokenizer.

  encode(text) -> token ids of `text` only: no <bos>/<eos> is added (callers add them).
  decode(ids) -> the text of a model response: reads ids up to (not including) the
    first <eos>; drops <pad>, <bos> and <img>; never raises, whatever the ids are
    (model output may hold any integer) -- ids without text become a replacement char.
  """

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def image_id(self) -> int:
    """Placeholder token whose embedding the model replaces with a vision embedding."""
    ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ToyTokenizer:
  """Character-level tokenizer for the toy task suite (60 ids).

  Ids: <pad>=0 <bos>=1 <eos>=2 <img>=3 <unk>=4, then one id per character of ALPHABET
  (digits, lowercase letters, space and a little punctuation). The task generators only
  ever produce ALPHABET characters, so encode() refuses anything else loudly instead of
  mapping it to <unk>.
  """

  SPECIALS = ("<pad>", "<bos>", "<eos>", "<img>", "<unk>")
  ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*=?:;,.#()<>/!'_"

  pad_id = 0
  bos_id = 1
  eos_id = 2
  image_id = 3
  unk_id = 4

  def __init__(self):
    first = len(self.SPECIALS)
    self._char_to_id = {ch: first + i for i, ch in enumerate(self.ALPHABET)}
    self._id_to_char = dict(enumerate(self.ALPHABET, start=first))
    # Ids that decode() drops silently: padding, sequence start, vision placeholders.
    self._silent_ids = frozenset((self.pad_id, self.bos_id, self.image_id))

  @property
  def vocab_size(self) -> int:
    return len(self.SPECIALS) + len(self.ALPHABET)

  def encode(self, text: str) -> list[int]:
    """text -> one id per character; no <bos>/<eos>. Unknown character -> ValueError."""
    if not isinstance(text, str):
      raise TypeError(f"ToyTokenizer.encode expects a str, got {type(text).__name__}")
    ids = []
    for position, ch in enumerate(text):
      token = self._char_to_id.get(ch)
      if token is None:
        raise ValueError(f"ToyTokenizer cannot encode character {ch!r} at position "
                         f"{position} of {text[:48]!r}; its alphabet is {self.ALPHABET!r}")
      ids.append(token)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """ids -> text up to the first <eos>; see Tokenizer.decode. Never raises on ids."""
    chars = []
    for raw in ids:
      try:
        token = int(raw)
      except (TypeError, ValueError, OverflowError):
        chars.append(REPLACEMENT_CHAR)
        continue
      if token == self.eos_id:
        break
      if token in self._silent_ids:
        continue
      chars.append(self._id_to_char.get(token, REPLACEMENT_CHAR))
    return "".join(chars)
