"""Record files with bad references, bytes, nesting or paths: errors name the file, line and field
(issue 13 items 3 and 11).

Each case reproduces a failure found by trying the project with bad input and injected faults,
and checks the behaviour that replaced it. Expected values are written out by hand."""
import json
import os

import pytest

from copd_jax.data import records as datasets


# ------------------------------------------------------- 13.3 bad references at load

@pytest.mark.parametrize("bad", ["\\frac{1}{", "\\frac{1}{}", "\\sqrt{}", "3+"])
def test_unparsable_math_reference_rejected_at_load_with_file_and_line(tmp_path, bad):
  path = tmp_path / "m.jsonl"
  rows = [{"prompt": "q1", "answer": "1/2"}, {"prompt": "q2", "answer": bad}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  with pytest.raises(ValueError, match=r"m\.jsonl:2.*answer"):
    datasets.RecordSource(str(path), capability="math")


def test_parsable_references_load(tmp_path):
  path = tmp_path / "m.jsonl"
  answers = ["\\frac{1}{2}", "(x+1)^2", "\\{1,2\\}", "(0,1]", "x=3", "\\text{yes}"]
  path.write_text("\n".join(json.dumps({"prompt": "q", "answer": a}) for a in answers) + "\n")
  assert len(datasets.RecordSource(str(path), capability="math")) == 6


# ------------------------------------------------------- 13.11 unclear record errors

def test_non_utf8_byte_names_file_and_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_bytes(b'{"prompt": "q", "answer": "1"}\n{"prompt": "q\xff", "answer": "1"}\n')
  with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8"):
    datasets.RecordSource(str(path), capability="math")


def test_deeply_nested_json_names_file_and_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "q", "answer": "1"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
  with pytest.raises(ValueError, match=r"d\.jsonl:2: JSON nested too deeply"):
    datasets.RecordSource(str(path), capability="math")


def test_lone_surrogate_in_a_prompt_names_the_field(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "q \\ud800", "answer": "1"}\n')
  with pytest.raises(ValueError, match=r"d\.jsonl:1: field 'prompt'.*surrogate"):
    datasets.RecordSource(str(path), capability="math")


def test_fifo_image_path_is_rejected_not_read(tmp_path):
  os.mkfifo(tmp_path / "pipe.png")
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"prompt": "q", "answer": "1", "images": ["pipe.png"]}) + "\n")
  with pytest.raises(ValueError, match=r"d\.jsonl:1: images\[0\] must name a regular file"):
    datasets.RecordSource(str(path), capability="math", image_size=32, num_frames=4)
