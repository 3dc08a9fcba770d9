"""Records through the Hugging Face `datasets` library (issue 15.10): a saved dataset
directory (load_from_disk) and local JSONL / Parquet read with load_dataset, a column
mapping from the config, the same validation errors naming row and field, and no
network access."""
import importlib.util
import io
import json
import os
import socket

import numpy as np
import pytest

hf_datasets = pytest.importorskip("datasets")

import fixture_configs
import paths
from copd_jax.config_lib import spec_of
from copd_jax import config_lib, policy_setup  # noqa: E402
from copd_jax.data import records as datasets

REPO = paths.REPO
FIXTURE_DATA = os.path.join(paths.FIXTURES, "data")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any attempt to open a network connection fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError("the datasets path tried to use the network")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # no cached hub state either
  datasets._load_records.cache_clear()


def png_bytes(color) -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
  return buffer.getvalue()


def save_math(tmp_path, rows) -> str:
  path = str(tmp_path / "gsm_like")
  hf_datasets.Dataset.from_list(rows).save_to_disk(path)
  return path


def test_saved_dataset_with_a_column_mapping(tmp_path):
  path = save_math(tmp_path, [
      {"question": "What is 2 + 3?", "final_answer": "5", "source": "a"},
      {"question": "Half of 1?", "final_answer": "0.5", "source": "b"}])
  records = datasets.load_records(path, capability="math",
                                  columns={"prompt": "question", "answer": "final_answer"})
  assert [(r.prompt, r.answer, r.verifier, r.where) for r in records] == [
      ("What is 2 + 3?", "5", "math", f"{path} row 0"),
      ("Half of 1?", "0.5", "math", f"{path} row 1")]


def test_saved_dataset_errors_name_the_row_and_field(tmp_path):
  path = save_math(tmp_path, [{"question": "ok?", "final_answer": "1"},
                              {"question": "", "final_answer": "2"}])
  with pytest.raises(ValueError, match=rf"{path} row 1: field 'prompt' must be non-empty"):
    datasets.load_records(path, capability="math",
                          columns={"prompt": "question", "answer": "final_answer"})
  with pytest.raises(ValueError, match=rf"{path} row 0: column 'solution_text' "
                                       r"\(config\.data\.columns\.answer\) is missing"):
    datasets.load_records(path, capability="math",
                          columns={"prompt": "question", "answer": "solution_text"})
  bad = save_math(tmp_path / "b", [{"prompt": "x?", "answer": "B", "verifier": "choice"},
                                    {"prompt": "y?", "answer": "B", "verifier": "gzip"}])
  with pytest.raises(ValueError, match=r"row 1: field 'answer'/'verifier'"):
    datasets.load_records(bad, capability="math")


def test_saved_dataset_dict_asks_for_a_split(tmp_path):
  path = str(tmp_path / "dd")
  split = hf_datasets.Dataset.from_list([{"prompt": "a?", "answer": "1"}])
  hf_datasets.DatasetDict({"train": split, "test": split}).save_to_disk(path)
  with pytest.raises(ValueError, match=r"a saved DatasetDict with splits .*name one split"):
    datasets.load_records(path, capability="math")
  assert len(datasets.load_records(os.path.join(path, "test"), capability="math")) == 1


def test_image_feature_records_are_read_undecoded_and_framed(tmp_path):
  path = str(tmp_path / "pictures")
  rows = {"q": ["Which colour?", "And this?"], "a": ["A", "B"],
          "img": [png_bytes((255, 0, 0)), png_bytes((0, 0, 255))]}
  features = hf_datasets.Features({"q": hf_datasets.Value("string"), "a": hf_datasets.Value("string"),
                                   "img": hf_datasets.Image()})
  hf_datasets.Dataset.from_dict(rows, features=features).save_to_disk(path)
  source = datasets.RecordSource(path, capability="image", image_size=4, num_frames=2,
                                 default_verifier="choice",
                                 columns={"prompt": "q", "answer": "a", "images": "img"})
  assert [r.modality for r in source.records] == ["image", "image"]
  frames = source[0].frames
  assert frames.shape == (1, 4, 4, 3)
  np.testing.assert_allclose(frames[0, 0, 0], [1.0, 0.0, 0.0], atol=1e-6)  # red
  np.testing.assert_allclose(source[1].frames[0, 0, 0], [0.0, 0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("name", ["math_train.jsonl", "science_train.parquet"])
def test_files_through_datasets_match_the_builtin_reader(name):
  path = os.path.join(FIXTURE_DATA, name)
  builtin = datasets.load_records(path)
  through = datasets.load_records(path, reader="datasets")
  strip = lambda rs: [(r.prompt, r.answer, r.capability, r.verifier) for r in rs]
  assert strip(through) == strip(builtin) and len(builtin) > 1
  assert through[1].where.startswith(f"{path} row 1")


def test_jsonl_through_datasets_names_the_bad_row(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in [
      {"prompt": "a?", "answer": "1", "capability": "math"},
      {"prompt": "b?", "answer": "2", "capability": "Math!"}]) + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl row 1: field 'capability' must be"):
    datasets.load_records(str(path), reader="datasets")


def hf_config():
  cfg = fixture_configs.load("hf_copd", "math,micro")
  cfg.method, cfg.num_experts = "base", 1  # one domain: evaluate the checkpoint
  return cfg


def test_a_run_config_reads_a_saved_dataset_with_mapped_columns(tmp_path):
  path = save_math(tmp_path, [{"question": f"What is {i} + 1?", "final": str(i + 1)}
                              for i in range(4)])
  cfg = hf_config()
  cfg.data.train_files.math = path
  cfg.data.eval_files.math = path
  cfg.data.columns = {"prompt": "question", "answer": "final"}
  config_lib.validate_config(cfg)
  setup = policy_setup.build_setup(spec_of(cfg))
  held_out = policy_setup.held_out_sets(spec_of(cfg), setup)["math"]
  assert [(ex.question, ex.answer) for ex in held_out] == [("What is 0 + 1?", "1"),
                                                            ("What is 1 + 1?", "2")]
  cfg.data.columns = {"prompt": "question", "answer": "final", "solutions": "x"}
  with pytest.raises(ValueError, match=r"config\.data\.columns maps 'solutions', which is not"):
    config_lib.validate_config(cfg)
  cfg.data.columns = {}
  cfg.data.reader = "arrow"
  with pytest.raises(ValueError, match=r"config\.data\.reader must be 'builtin' or 'datasets'"):
    config_lib.validate_config(cfg)
