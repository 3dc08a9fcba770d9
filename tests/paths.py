"""Where the tests find the repository and the committed fixtures: one place, whichever
directory under tests/ a test file sits in (tests/ is on sys.path: conftest.py lives
there)."""
import os

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
# Committed fixtures: tiny Hugging Face checkpoints and tokenizers (hf/), record files (data/).
FIXTURES = os.path.join(TESTS, "fixtures")
HF_FIXTURES = os.path.join(FIXTURES, "hf")
DATA_FIXTURES = os.path.join(FIXTURES, "data")
EXPERIMENTS = os.path.join(REPO, "experiments")
QWEN3_VL_TINY = os.path.join(HF_FIXTURES, "qwen3_vl_tiny")  # with reference.npz


def reference_outputs(checkpoint_dir: str) -> dict:
  """A fixture checkpoint's reference.npz (the Hugging Face implementation's outputs) as a
  dict of numpy arrays."""
  import numpy as np
  with np.load(os.path.join(checkpoint_dir, "reference.npz")) as data:
    return dict(data)
