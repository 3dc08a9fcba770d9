"""The earlier recipes' runs, kept as one runs.tar.xz per recipe, still make their reports:
experiments/run_archive.py extracts them for `reproduce.py --report_only`."""
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest

import paths  # noqa: E402  (tests/paths.py)
sys.path.insert(0, paths.EXPERIMENTS)
import run_archive  # noqa: E402

ROOT = paths.REPO
CAPS = ("text", "image", "video")
ROUNDING = 0.05 + 1e-9  # the report rounds points to one or two decimals


def write_tar(path, members: dict[str, bytes]):
  with tarfile.open(path, "w:xz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_an_archive_is_extracted_for_a_report_and_removed_at_exit(tmp_path):
  archive = tmp_path / "runs.tar.xz"
  write_tar(archive, {"runs/base/summary.json": b"{}", "runs/seed0/copd/summary.json": b"[]"})
  runs = run_archive.extract_runs(str(archive), str(tmp_path / "x"))
  assert runs == str(tmp_path / "x" / "runs")
  assert open(os.path.join(runs, "seed0", "copd", "summary.json")).read() == "[]"
  assert run_archive.runs_dir("experiments/results/runs", report_only=False) == "experiments/results/runs"


def test_runs_cannot_be_written_into_an_archive(tmp_path):
  archive = tmp_path / "runs.tar.xz"
  write_tar(archive, {"runs/base/summary.json": b"{}"})
  with pytest.raises(SystemExit, match="only --report_only reads one"):
    run_archive.runs_dir(str(archive), report_only=False)


@pytest.mark.parametrize("name", ["../evil.json", "elsewhere/evil.json"])
def test_members_outside_runs_are_refused(tmp_path, name):
  archive = tmp_path / "runs.tar.xz"
  write_tar(archive, {"runs/base/summary.json": b"{}", name: b"x"})
  with pytest.raises(SystemExit, match="outside runs/"):
    run_archive.extract_runs(str(archive), str(tmp_path / "x"))
  assert not (tmp_path / "evil.json").exists()


def rewards(runs, workdir):
  with np.load(os.path.join(runs, workdir, "eval_rewards.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize("recipe", ["v1", "v2"])
def test_committed_archive_holds_the_runs_of_its_report(tmp_path, recipe):
  """Oracle: the committed results.json of the recipe. Each model's mean accuracy per
  capability (a plain mean over seeds and items, no bootstrap) is recomputed from the
  per-item rewards in the archive, and every run the report lists is there."""
  folder = os.path.join(ROOT, "experiments", "results", recipe)
  runs = run_archive.extract_runs(os.path.join(folder, "runs.tar.xz"), str(tmp_path))
  with open(os.path.join(folder, "results.json")) as f:
    report = json.load(f)
  for run in report["runs_finished"]:
    assert os.path.exists(os.path.join(runs, run, "summary.json")), run
  seeds = report["seeds"]
  keys = {"Text expert": ("experts", "branch/text/{}"), "Image expert": ("experts", "branch/image/{}"),
          "Video expert": ("experts", "branch/video/{}"),
          "Mixed RLVR": ("mixed_rlvr", "branch/text+image+video/{}"),
          "MOPD": ("mopd", "branch/student/{}"), "CoPD (merged)": ("copd", "merged/{}")}
  base = rewards(runs, "base")
  checked = 0
  for cap in CAPS:
    assert abs(100 * base[f"base/{cap}"].mean()
               - report["accuracy_points"]["Base"][cap]["mean"]) <= ROUNDING
    for model, (run, key) in keys.items():
      if model not in report["accuracy_points"]:
        continue
      per_seed = [rewards(runs, f"seed{s}/{run}")[key.format(cap)] for s in seeds]
      mean = 100 * float(np.mean(np.stack(per_seed)))
      assert abs(mean - report["accuracy_points"][model][cap]["mean"]) <= ROUNDING, (model, cap)
      checked += 1
  assert checked >= 9
