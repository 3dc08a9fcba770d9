"""Runs kept as one compressed archive: the earlier recipes' run trees.

The small files of every run of an earlier recipe (config.json, summary.json,
eval_rewards.npz, metrics.jsonl under runs/seed<N>/<run>/ and runs/base/) are committed as
one `runs.tar.xz` per recipe (experiments/results/v1, v2) instead of a few hundred files.
A report reads them with `--runs <recipe>/runs.tar.xz --report_only`:

    python experiments/reproduce.py --report_only --out experiments/results/v2 \
        --runs experiments/results/v2/runs.tar.xz

The archive's top folder is `runs/`; nothing outside it is extracted, and tarfile's
"data" filter refuses links, devices and paths that would leave the target directory.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tarfile
import tempfile

ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tar")
TOP = "runs"


def is_archive(path: str) -> bool:
  return path.endswith(ARCHIVE_SUFFIXES)


def extract_runs(archive: str, into: str) -> str:
  """Extracts `archive` (its members all under runs/) into `into`; returns into/runs."""
  if not os.path.isfile(archive):
    raise SystemExit(f"--runs {archive}: no such archive")
  with tarfile.open(archive) as tar:
    outside = [m.name for m in tar.getmembers()
               if m.name != TOP and not m.name.startswith(TOP + "/")]
    if outside:
      raise SystemExit(f"--runs {archive}: members outside {TOP}/: {outside[:3]}")
    tar.extractall(into, filter="data")
  return os.path.join(into, TOP)


def runs_dir(runs: str, report_only: bool) -> str:
  """The runs directory `--runs` names: itself, or an archive extracted to a temporary
  directory that is removed at exit. Only a report reads an archive: runs cannot be
  written into one (extract it with `tar -xJf` to continue or rerun them)."""
  if not is_archive(runs):
    return runs
  if not report_only:
    raise SystemExit(f"--runs {runs} is an archive: only --report_only reads one; "
                     f"extract it (tar -xJf) to run or continue its runs")
  tmp = tempfile.mkdtemp(prefix="copd_runs_")
  atexit.register(shutil.rmtree, tmp, True)
  return extract_runs(runs, tmp)
