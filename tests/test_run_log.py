"""What a run reports (issue 15.6): completions as TensorBoard text + JSONL, the config as
TensorBoard hyperparameters, and after a resume TensorBoard curves equal to an
uninterrupted run's (tensorboardX purge_step). Event files are read back with the protos
tensorboardX ships, and TensorBoard's purge rule is applied as TensorBoard applies it: a
SessionLog START at step P drops every earlier point with step >= P."""
import glob
import json
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from copd_jax.config_lib import spec_of
from copd_jax import default_config, run_log
from copd_jax.run_log import MetricsWriter


def read_events(logdir):
  """Every Event of the event files directly in `logdir`, files in name order (the order
  TensorBoard reads them)."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event()
      event.ParseFromString(record)
      events.append(event)
  return events


def scalar_curves(logdir) -> dict:
  """{tag: {step: value}} as TensorBoard shows it (purges applied)."""
  points = []  # (tag, step, value)
  for event in read_events(logdir):
    if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
      points = [p for p in points if p[1] < event.step]
    for value in event.summary.value:
      if value.HasField("simple_value"):
        points.append((value.tag, event.step, value.simple_value))
  curves = {}
  for tag, step, value in points:
    curves.setdefault(tag, {}).setdefault(step, []).append(value)
  return curves


def test_resume_drops_the_killed_runs_points_from_tensorboard(tmp_path):
  first = MetricsWriter(str(tmp_path))
  first.write(10, {"warm_start/loss": 9.0})  # the warm-start keeps its own run
  for step in (1, 2):
    first.write(step, {"train/loss": float(step)})
  offset = first.jsonl_size()  # a checkpoint at step 2
  for step in (3, 4):  # logged, then the run is killed
    first.write(step, {"train/loss": float(step)})
  first.close()

  resumed = MetricsWriter(str(tmp_path))
  assert resumed.rewind_jsonl(offset, purge_step=3)
  for step in (3, 4, 5):
    resumed.write(step, {"train/loss": 10.0 * step})
  resumed.close()

  curves = scalar_curves(tmp_path / "tb")
  assert curves["train/loss"] == {1: [1.0], 2: [2.0], 3: [30.0], 4: [40.0], 5: [50.0]}
  assert scalar_curves(tmp_path / "tb" / "warm_start")["warm_start/loss"] == {10: [9.0]}
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [(l["step"], l.get("train/loss")) for l in lines] == [
      (10, None), (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_completions_go_to_jsonl_and_tensorboard_text_and_are_rewound(tmp_path):
  writer = MetricsWriter(str(tmp_path))
  writer.write(1, {"train/loss": 1.0})
  offset = writer.jsonl_size()
  records = [{"branch": "text", "capability": "text", "prompt": "2+3=", "answer": "5",
              "response": "5#", "reward": 1.0}]
  writer.write_completions(1, "eval", records)
  writer.write(2, {"train/loss": 2.0})
  writer.write_completions(2, "train", [dict(records[0], row="cross", teacher="image",
                                             teacher_log_ratio=-0.25)])
  writer.close()
  lines = [json.loads(l) for l in open(tmp_path / "completions.jsonl")]
  assert [(l["step"], l["tag"], l["response"]) for l in lines] == [(1, "eval", "5#"), (2, "train", "5#")]
  assert lines[1]["teacher_log_ratio"] == -0.25
  texts = {v.tag: v.tensor.string_val[0].decode() for e in read_events(tmp_path / "tb")
           for v in e.summary.value if v.tag.startswith("completions/")}
  assert set(texts) == {"completions/eval/text_summary", "completions/train/text_summary"}
  table = texts["completions/eval/text_summary"].splitlines()
  assert table[0] == "| branch | capability | prompt | answer | response | reward |"
  assert table[2] == "| text | text | 2+3= | 5 | 5# | 1.0 |"

  resumed = MetricsWriter(str(tmp_path))
  resumed.rewind_jsonl(offset, purge_step=2)  # resumed from a checkpoint at step 1
  resumed.close()
  assert [json.loads(l)["step"] for l in open(tmp_path / "completions.jsonl")] == [1]


def test_config_goes_to_tensorboard_hparams_and_text(tmp_path):
  cfg = default_config.get("copd", "micro")
  writer = MetricsWriter(str(tmp_path))
  writer.write_config(json.loads(cfg.to_json_best_effort()), metric_tags=["eval/accuracy/overall"])
  writer.close()
  hparams, config_text = {}, None
  for event in read_events(tmp_path / "tb"):
    for value in event.summary.value:
      if value.tag == "_hparams_/session_start_info":
        data = plugin_hparams_pb2.HParamsPluginData()
        data.ParseFromString(value.metadata.plugin_data.content)
        hparams = dict(data.session_start_info.hparams)
      if value.tag == "config/text_summary":
        config_text = value.tensor.string_val[0].decode()
  assert hparams["rl.learning_rate"].number_value == pytest.approx(cfg.rl.learning_rate)
  assert hparams["method"].string_value == "copd"
  assert hparams["rl.capabilities"].string_value == '["text", "image", "video"]'
  assert json.loads(config_text.strip("`\n"))["rl"]["opd"]["beta"] == cfg.rl.opd.beta


def test_wandb_mirror_offline(tmp_path):
  pytest.importorskip("wandb")
  os.environ.setdefault("WANDB_SILENT", "true")
  mirror = run_log.WandbMirror(str(tmp_path), project="copd-jax-test", mode="offline",
                               name="t", config_json={"rl": {"learning_rate": 0.1}})
  writer = MetricsWriter(str(tmp_path), mirror=mirror)
  writer.write(1, {"train/loss": 0.5})
  writer.write_completions(1, "eval", [{"prompt": "p", "response": "r", "reward": 0.0}])
  writer.close()
  runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
  assert len(runs) == 1
  assert glob.glob(os.path.join(runs[0], "*.wandb"))  # the run's local record, never uploaded


# ----------------------------------------------------------- a real run, crashed and resumed


def micro_copd(workdir):
  cfg = default_config.get("copd", "micro")
  cfg.workdir = str(workdir)
  cfg.rl.update(dict(steps=3, eval_every=3, diagnostics_every=3))
  cfg.checkpoint.every_steps = 1
  cfg.log.update(dict(completions=1, completions_every=1))
  return cfg


def run_method(cfg, base):
  from copd_jax.rl import methods
  setup, params = base
  writer = MetricsWriter(cfg.workdir)
  try:
    return methods.run_rl_method(spec_of(cfg), setup, params, writer)
  finally:
    writer.close()


def timing_free(curves):
  return {k: v for k, v in curves.items() if not k.startswith(("train/time/", "train/throughput/"))}


def test_a_crashed_and_resumed_run_logs_what_an_uninterrupted_run_logs(tmp_path, monkeypatch):
  import jax

  from copd_jax import policy_setup, train_checkpoint
  from copd_jax.models import decoder as model_lib
  cfg = micro_copd(tmp_path / "reference")
  setup = policy_setup.build_setup(spec_of(cfg))
  base = (setup, model_lib.init_params(setup.model_cfg, jax.random.key(0)))
  run_method(cfg, base)

  # Killed after step 3 was logged (its scalars, evaluation and completions) but before
  # its checkpoint was saved: the resumed run redoes step 3 from the checkpoint at step 2.
  crashed = micro_copd(tmp_path / "crashed")
  real_save = train_checkpoint.StageCheckpointer.save
  def crash_saving_step_3(self, state, host, names):
    if host.stage_step == 3:
      raise RuntimeError("simulated crash")
    return real_save(self, state, host, names)
  with monkeypatch.context() as patch:
    patch.setattr(train_checkpoint.StageCheckpointer, "save", crash_saving_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
      run_method(crashed, base)
  logged = [json.loads(l)["step"] for l in open(tmp_path / "crashed" / "metrics.jsonl")]
  assert max(logged) == 3  # the killed run had logged step 3
  run_method(crashed, base)  # resumes from the checkpoint at step 2

  want = timing_free(scalar_curves(tmp_path / "reference" / "tb"))
  got = timing_free(scalar_curves(tmp_path / "crashed" / "tb"))
  assert got == want
  assert all(len(values) == 1 for curve in got.values() for values in curve.values())

  completions = lambda d: [json.loads(l) for l in open(d / "completions.jsonl")]
  assert completions(tmp_path / "crashed") == completions(tmp_path / "reference")
  records = completions(tmp_path / "reference")
  train = [r for r in records if r["tag"] == "train"]
  assert sorted({r["step"] for r in train}) == [1, 2, 3]  # every step (completions_every=1)
  # Every branch logs a native row each step; the OPD step (the micro cycle is 1 RL : 1
  # OPD, so step 2) adds cross rows with the teacher and its mean log-ratio.
  assert {(r["step"], r["branch"]) for r in train if r["row"] == "native"} == {
      (s, b) for s in (1, 2, 3) for b in ("text", "image", "video")}
  cross = [r for r in train if r["row"] == "cross"]
  assert cross and all(r["step"] == 2 and r["teacher"] in ("text", "image", "video")
                       and np.isfinite(r["teacher_log_ratio"]) for r in cross)
  evals = [r for r in records if r["tag"] == "eval"]
  assert {(r["step"], r["capability"], r["branch"]) for r in evals} == {
      (s, c, b) for s in (0, 3) for c in ("text", "image", "video") for b in ("text", "image", "video")}
  assert all(r["reward"] in (0.0, 1.0) for r in records)


def test_phase_lines_show_progress_and_eta():
  import io
  ticks = iter([0.0, 2.0, 4.0, 6.5])  # start, after part 1, after part 2, end
  out = io.StringIO()
  with run_log.Phase("eval at step 3", total=3, stream=out, clock=lambda: next(ticks)) as phase:
    phase.advance("text")
    phase.advance("image")
  assert out.getvalue().splitlines() == [
      "eval at step 3 ...",
      "eval at step 3 1/3 | text | eta 4s",   # 2 s per part, 2 parts left
      "eval at step 3 2/3 | image | eta 2s",  # 2 s per part, 1 part left
      "eval at step 3 done in 6.5s"]
  assert run_log.branch_line("held-out accuracy", {"text": 0.3125, "image": 0.25}) == \
      "held-out accuracy | text 0.312 | image 0.250"
