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
