"""The documentation's shape: README.md stays an entry point (at most 350 lines), and every
relative link in README.md, docs/*.md and experiments/README.md reaches a file (and, with
a #fragment, a heading of that file)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_MAX_LINES = 350
# Files that a script writes, not a person: a link to them is checked only once they exist.
GENERATED = {ROOT / "experiments" / "RESULTS.md"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_files() -> list[pathlib.Path]:
  return [ROOT / "README.md", ROOT / "experiments" / "README.md",
          *sorted((ROOT / "docs").glob("*.md"))]


def heading_anchor(heading: str) -> str:
  """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to -."""
  text = heading.strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  return {heading_anchor(line.lstrip("#")) for line in path.read_text().splitlines()
          if line.startswith("#")}


def broken_links(path: pathlib.Path) -> list[str]:
  """Relative links of `path` whose file, or whose #fragment's heading, does not exist."""
  broken = []
  for target in LINK.findall(path.read_text()):
    if re.match(r"[a-z]+:", target):        # http:, https:, mailto:
      continue
    file_part, _, fragment = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    if dest in GENERATED and not dest.exists():
      continue
    if not dest.exists():
      broken.append(f"{target} (no such file)")
    elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
      broken.append(f"{target} (no heading #{fragment})")
  return broken


def test_readme_is_at_most_350_lines():
  lines = len((ROOT / "README.md").read_text().splitlines())
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_heading_anchor_matches_github():
  assert heading_anchor(" The divergence dial: `dial.py`") == "the-divergence-dial-dialpy"
  assert heading_anchor(" One run per directory") == "one-run-per-directory"


def test_broken_links_are_found(tmp_path):
  (tmp_path / "other.md").write_text("# A heading\n")
  page = tmp_path / "page.md"
  page.write_text("[ok](other.md#a-heading) [web](https://x.org) [gone](missing.md) "
                  "[bad](other.md#nothing)\n")
  assert broken_links(page) == ["missing.md (no such file)", "other.md#nothing (no heading #nothing)"]


def test_documentation_links_resolve():
  files = doc_files()
  assert len(files) >= 5
  assert {str(p.relative_to(ROOT)): b for p in files if (b := broken_links(p))} == {}


SOURCE_PATH = re.compile(r"(?<![\w/.])((?:copd_jax|kernels|configs|experiments|tests)/[\w/.-]*\.py)\b")


def missing_source_files(path: pathlib.Path) -> list[str]:
  """Python files the text of `path` names (`copd_jax/...py`, `tests/...py`, ...) that do
  not exist: a module or test moved and the documentation kept its old name."""
  return sorted({m for m in SOURCE_PATH.findall(path.read_text()) if not (ROOT / m).exists()})


def test_missing_source_files_are_found(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("`copd_jax/main.py` and copd_jax/trainer.py, tests/test_docs.py\n")
  assert missing_source_files(page) == ["copd_jax/trainer.py"]


def test_documentation_names_only_files_that_exist():
  assert {str(p.relative_to(ROOT)): m for p in doc_files() if (m := missing_source_files(p))} == {}
