"""A run directory belongs to one training config (issue 13, items 7 and 8).

Found on main: another method in a used workdir rewound metrics.jsonl to 0 bytes and
overwrote summary.json and final_params; a resume with a changed learning rate silently
returned the old run and overwrote config.json. Now both are an error naming what differs,
raised before anything in the directory changes; an explicit flag resumes on purpose."""
import hashlib
import json
import os
import re

import jax
import pytest

from copd_jax.config_lib import spec_of
from copd_jax import checkpoint, cli, default_config, main, policy_setup, run_dir, warm_start
from copd_jax.models import decoder as model_lib


def snapshot(directory) -> dict:
  """{relative path: sha256 of its bytes} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """A saved base policy under the micro recipe, so runs load it instead of training."""
  root = tmp_path_factory.mktemp("workdir_base")
  cfg = default_config.get("copd", "micro")
  setup = policy_setup.build_setup(spec_of(cfg))
  params = model_lib.init_params(setup.model_cfg, jax.random.key(0))
  checkpoint.save_policy(str(root / "base"), params, warm_start.base_policy_metadata(spec_of(cfg)))
  return str(root / "base")


def micro(method, workdir, base_dir, **rl):
  cfg = default_config.get(method, "micro")
  cfg.workdir = str(workdir)
  cfg.warm_start.checkpoint_dir = base_dir
  cfg.rl.update(dict(steps=1, eval_every=1, **rl))
  return cfg


def fake_finished_run(workdir, cfg):
  """What a finished run leaves, written by hand: config, log, summary, final params."""
  os.makedirs(os.path.join(workdir, "final_params"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "train/loss": 0.5}) + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"method": cfg.method, "final": {"accuracy/overall": 0.25}}, f)
  with open(os.path.join(workdir, "final_params", "metadata.json"), "w") as f:
    json.dump({"method": cfg.method}, f)


def test_another_method_in_a_used_workdir_is_an_error_and_nothing_changes(tmp_path, base_dir):
  workdir = tmp_path / "run"
  fake_finished_run(str(workdir), micro("experts", workdir, base_dir))
  before = snapshot(workdir)
  with pytest.raises(run_dir.WorkdirConfigError, match=r"holds a 'experts' run, not 'copd'"):
    main.run(micro("copd", workdir, base_dir))
  assert snapshot(workdir) == before  # not rewound, not overwritten, nothing added


def test_a_changed_learning_rate_is_an_error_naming_the_field(tmp_path, base_dir):
  workdir = tmp_path / "run"
  fake_finished_run(str(workdir), micro("copd", workdir, base_dir))
  before = snapshot(workdir)
  old = default_config.get("copd", "micro").rl.learning_rate
  assert old != 1e-3
  changed = micro("copd", workdir, base_dir, learning_rate=1e-3)
  with pytest.raises(run_dir.WorkdirConfigError, match=re.escape(
      f"rl.learning_rate: directory has {old!r}, this run has 0.001")):
    main.run(changed)
  assert snapshot(workdir) == before


@pytest.mark.parametrize("field, value", [
    ("rl.opd.beta", 0.5), ("rl.opd.schedule.s_rl", 2), ("rl.samples_per_prompt", 4),
    ("data.max_prompt_len", 96), ("seed", 3)])
def test_every_training_field_change_is_named(tmp_path, field, value):
  cfg = default_config.get("copd", "micro")
  stored = json.loads(cfg.to_json_best_effort())
  default_config.set_field(cfg, field, value)
  diffs = run_dir.differences(run_dir.training_config(stored), run_dir.training_config(cli.as_json(cfg)))
  assert len(diffs) == 1 and diffs[0].startswith(f"{field}: directory has ")


def test_operational_fields_may_change_on_resume():
  cfg = default_config.get("copd", "micro")
  stored = json.loads(cfg.to_json_best_effort())
  cfg.checkpoint.every_steps = 5
  cfg.rl.log_every = 7
  cfg.workdir = "elsewhere"
  cfg.eval.batch_size = 3
  assert run_dir.differences(run_dir.training_config(stored), run_dir.training_config(cli.as_json(cfg))) == []


def test_same_config_resumes_and_the_flag_resumes_a_changed_one_on_purpose(tmp_path, base_dir):
  workdir = tmp_path / "run"
  first = main.run(micro("copd", workdir, base_dir))
  assert first["optimizer_steps"] == 1
  log = (workdir / "metrics.jsonl").read_bytes()

  # The same config: the finished stage is restored, the log keeps its lines.
  again = main.run(micro("copd", workdir, base_dir))
  assert again["branches"] == first["branches"]

  changed = micro("copd", workdir, base_dir, learning_rate=1e-3)
  before = snapshot(workdir)
  with pytest.raises(run_dir.WorkdirConfigError, match=r"rl\.learning_rate"):
    main.run(changed)
  assert snapshot(workdir) == before

  changed.checkpoint.resume_changed_config = True
  resumed = main.run(changed)
  assert resumed["branches"] == first["branches"]  # the finished stage, restored
  stored = json.loads((workdir / "config.json").read_text())
  assert stored["rl"]["learning_rate"] == 1e-3
  kept = json.loads((workdir / "config.replaced.1.json").read_text())
  assert kept["rl"]["learning_rate"] == default_config.get("copd", "micro").rl.learning_rate
  assert (workdir / "metrics.jsonl").read_bytes().startswith(log[:100])


def test_a_run_directory_without_config_json_is_not_adopted(tmp_path, base_dir):
  workdir = tmp_path / "run"
  os.makedirs(workdir / "checkpoints" / "copd" / "1")
  with pytest.raises(run_dir.WorkdirConfigError, match=r"without config\.json"):
    main.run(micro("copd", workdir, base_dir))
  assert not (workdir / "config.json").exists()


def test_a_method_change_is_refused_even_with_the_flag(tmp_path, base_dir):
  workdir = tmp_path / "run"
  fake_finished_run(str(workdir), micro("experts", workdir, base_dir))
  cfg = micro("copd", workdir, base_dir)
  cfg.checkpoint.resume_changed_config = True
  with pytest.raises(run_dir.WorkdirConfigError, match=r"belongs to one method"):
    main.run(cfg)
