"""ToyTokenizer: ids, round trips, loud encode errors, decode that never raises."""
import numpy as np
import pytest

from copd_jax.data import toy_tasks as tasks
from copd_jax.data.tokenizer import REPLACEMENT_CHAR, Tokenizer, ToyTokenizer


@pytest.fixture(scope="module")
def tok():
  return ToyTokenizer()


def test_special_ids_and_vocab_size(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id, tok.unk_id) == (0, 1, 2, 3, 4)
  assert tok.vocab_size <= 64
  assert tok.vocab_size == len(ToyTokenizer.SPECIALS) + len(ToyTokenizer.ALPHABET)
  assert len(set(ToyTokenizer.ALPHABET)) == len(ToyTokenizer.ALPHABET)
  assert isinstance(tok, Tokenizer)


def test_encode_is_one_id_per_char_without_specials(tok):
  ids = tok.encode("3+4=7#7")
  assert len(ids) == 7
  assert all(5 <= i < tok.vocab_size for i in ids)
  assert tok.encode("") == []


def test_round_trip_whole_alphabet(tok):
  text = ToyTokenizer.ALPHABET
  assert tok.decode(tok.encode(text)) == text


def test_round_trip_generated_examples(tok):
  for cap in tasks.CAPABILITIES:
    for index in range(20):
      ex = tasks.make_example(cap, index, seed=3, difficulty=index % 4)
      for text in (ex.question, ex.solution):
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("bad", ["A", "é", "\n", "3+4\u0663", "\u00a0"])
def test_encode_unknown_char_names_it(tok, bad):
  with pytest.raises(ValueError, match="cannot encode character"):
    tok.encode("ok " + bad)
  try:
    tok.encode("ok " + bad)
  except ValueError as err:
    assert repr(bad[-1]) in str(err)


def test_encode_rejects_non_strings(tok):
  with pytest.raises(TypeError):
    tok.encode([1, 2])


def test_decode_skips_specials_and_stops_at_eos(tok):
  body = tok.encode("12#12")
  ids = [tok.pad_id, tok.bos_id, tok.image_id, tok.image_id] + body + [tok.eos_id] + tok.encode("99")
  assert tok.decode(ids) == "12#12"
  assert tok.decode([tok.eos_id] + body) == ""
  assert tok.decode(np.array(body + [tok.pad_id, tok.pad_id], np.int32)) == "12#12"


def test_decode_never_raises_on_garbage(tok):
  garbage = [tok.unk_id, -1, tok.vocab_size, 10**30, -(10**30), 3.7, float("nan"),
             float("inf"), None, "x", np.int64(2**62)]
  text = tok.decode(garbage)
  assert isinstance(text, str)
  # unk, -1, vocab_size, 10**30, -(10**30), nan, inf, None, "x", 2**62 -> replacement
  # chars; 3.7 truncates to id 3 (<img>) and is dropped.
  assert text == REPLACEMENT_CHAR * 10
  rng = np.random.default_rng(0)
  random_ids = rng.integers(-100, 200, size=5000)
  assert isinstance(tok.decode(random_ids), str)
