"""Fault injection: each case reproduces a failure found by trying the project with bad
input and injected faults, and checks the behaviour that replaced it. Expected values are
written out by hand (what a person checking the answer would say), not computed by the
code under test."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from copd_jax import config_lib, default_config
from copd_jax.data import (
  answers as verifiers,
  examples as examples_lib,
  math_verifier,
  records as datasets,
  toy_tasks as tasks,
  verifiers as verifiers_lib,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def math_example(answer):
  return examples_lib.Example("math", "q", answer, verifier="math", modality="text")


# ------------------------------------------------------- 13.1 symbolic answers scored 0

@pytest.mark.parametrize("response, answer", [
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{x(x+3)}", "x^2+3x"),
    ("\\boxed{\\sin^2x+\\cos^2x}", "1"),
    ("\\boxed{\\frac{x^2-1}{x-1}}", "x+1"),
    ("\\boxed{2\\sin x\\cos x}", "\\sin 2x"),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}"),
])
def test_symbolic_equivalents_score_one(response, answer):
  assert math_verifier.math_equivalent(response, answer) == 1.0


@pytest.mark.parametrize("response, answer", [
    ("\\boxed{x^2+2x}", "(x+1)^2"), ("\\boxed{x(x-3)}", "x^2+3x"),
    ("\\boxed{\\sin^2x-\\cos^2x}", "1"),
])
def test_symbolic_non_equivalents_score_zero(response, answer):
  assert math_verifier.math_equivalent(response, answer) == 0.0


def test_no_module_is_imported_after_the_guard():
  """The guard is installed after everything the comparisons import: checking symbolic
  answers imports nothing new in the worker."""
  for response, answer in [("\\boxed{x^2+2x+1}", "(x+1)^2"), ("\\boxed{\\sin^2x+\\cos^2x}", "1"),
                           ("\\boxed{(0,1]}", "(0,1]"), ("\\boxed{\\int_0^1 x dx}", "1/2")]:
    math_verifier.math_equivalent(response, answer)
  pool = verifiers_lib.shared_pool()
  late, _ = pool.run([("late_imports",)] * pool.size, timeout_s=30)
  assert late == [[]] * pool.size


def test_guard_still_refuses_model_text_after_the_fix():
  code = textwrap.dedent("""
      import sympy
      from copd_jax.data import math_verifier
      math_verifier._install_parse_expr_guard()
      assert sympy.Number('12') == 12
      import sympy.physics.units  # a module's own import-time constants are allowed
      for text in ("__import__('os')", 'x+1', 'yotta'):
        try:
          sympy.sympify(text)
        except Exception:
          continue
        raise SystemExit('parsed ' + repr(text))
      print('guarded')
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=1800, cwd=REPO)  # a safety net, generous under load
  assert out.returncode == 0 and "guarded" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------- 13.2 the answer phrase

@pytest.mark.parametrize("response", [
    "The answer is 7.", "The answer is: 7", "So the final answer is **7**.",
    "Answer: $7$", "The answer is 7. I checked it twice.", "The answer is\n\n7\n",
])
def test_answer_phrase_in_ordinary_text(response):
  assert verifiers.final_answer_text(response) == "7"
  assert math_verifier.math_equivalent(response, "7") == 1.0
  assert verifiers.exact_reward(response, "7") == 1.0


def test_answer_phrase_keeps_decimals_and_rejects_wrong_answers():
  assert verifiers.final_answer_text("The answer is 3.5.") == "3.5"
  assert math_verifier.math_equivalent("The answer is: 3.5.", "7/2") == 1.0
  assert math_verifier.math_equivalent("The answer is 8.", "7") == 0.0


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


# ----------------------------------------------- 13.4 time limit in config, step budget

HANG = "\\boxed{9^{9^{9^{9}}}}"  # sympy computes this power for hours


def test_per_answer_limit_comes_from_the_config():
  config = verifiers_lib.RewardConfig(timeout_s=0.5, workers=1)
  rewards, stats = verifiers_lib.score([HANG, "\\boxed{7}"], [math_example("7")] * 2, config)
  np.testing.assert_array_equal(rewards, [0.0, 1.0])
  assert (stats.timeouts, stats.over_budget) == (1, 0)


def test_step_budget_bounds_a_batch_of_hanging_answers():
  # Each hanging answer has a 100 s limit; the batch's 2 s budget ends all of them.
  config = verifiers_lib.RewardConfig(timeout_s=100.0, step_budget_s=2.0, workers=2)
  hanging = [f"\\boxed{{9^{{9^{{9^{{{k}}}}}}}}}" for k in range(9, 13)]
  rewards, stats = verifiers_lib.score(hanging, [math_example("7")] * 4, config)
  np.testing.assert_array_equal(rewards, [0, 0, 0, 0])
  assert stats.over_budget == 4 and stats.timeouts == 0
  # The pool recovers: the next batch is scored normally.
  rewards, _ = verifiers_lib.score(["\\boxed{7}"], [math_example("7")], config)
  assert rewards.tolist() == [1.0]


@pytest.mark.parametrize("field, value", [("timeout_s", 0.0), ("step_budget_s", -1.0),
                                          ("workers", 0), ("timeout_s", float("inf"))])
def test_reward_config_fields_are_checked(field, value):
  cfg = default_config.get("copd", "micro")
  cfg.reward[field] = value
  with pytest.raises(ValueError, match=rf"config\.reward\.{field}"):
    config_lib.validate_config(cfg)


# ------------------------------------------------------ 13.5 worker dies with its parent

def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_dies_when_its_parent_is_killed():
  code = textwrap.dedent("""
      import threading, time
      from copd_jax.data import math_verifier
      pool = math_verifier.VerifierPool(1)
      threading.Thread(target=pool.run, args=([("math", "7", "9^{9^{9^{9}}}")], 3600.0),
                       daemon=True).start()
      while not pool._workers or pool._workers[0].job is None:  # busy on the hanging answer
        time.sleep(0.05)
      print(pool.pids()[0], flush=True)
      time.sleep(3600)
  """)
  parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
  worker = int(parent.stdout.readline())
  assert _alive(worker)
  parent.kill()  # SIGKILL: no handler, no atexit
  parent.wait()
  deadline = time.monotonic() + 60
  while _alive(worker) and time.monotonic() < deadline:
    time.sleep(0.1)
  alive = _alive(worker)
  if alive:
    os.kill(worker, signal.SIGKILL)
  assert not alive, "the verifier worker outlived its SIGKILLed parent"


# ------------------------------------------------------------ 15.8 reward plug-ins

PLUGIN = """
import os

def exact(response, example):
  return 1.0 if response.strip() == example.answer else 0.0

def pid(response, example):
  return float(os.getpid())

def hang(response, example):
  while True:
    pass

def broken(response, example):
  raise RuntimeError('bug in the plug-in')

def nan(response, example):
  return float('nan')
"""


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
  (tmp_path / "my_rewards.py").write_text(PLUGIN)
  monkeypatch.syspath_prepend(str(tmp_path))
  return "my_rewards"


def test_plugin_reward_runs_in_a_worker_with_the_time_limit(plugin_module):
  examples = [math_example("7"), math_example("8")]
  config = verifiers_lib.RewardConfig(fn=f"{plugin_module}:exact", workers=1)
  np.testing.assert_array_equal(verifiers_lib.rewards_for(["7", "7"], examples, config), [1, 0])
  pids = verifiers_lib.rewards_for(["a"], examples[:1],
                               verifiers_lib.RewardConfig(fn=f"{plugin_module}:pid", workers=1))
  assert pids[0] not in (0.0, float(os.getpid()))  # another process
  rewards, stats = verifiers_lib.score(["7"], examples[:1], verifiers_lib.RewardConfig(
      fn=f"{plugin_module}:hang", timeout_s=0.5, workers=1))
  assert rewards.tolist() == [0.0] and stats.timeouts == 1
  for fn in ("broken", "nan"):  # a failing or non-finite plug-in result is an error
    # (issue 29: loud, not a silent 0; tests/test_faults_rewards.py has the details)
    with pytest.raises(verifiers_lib.RewardFunctionError, match=rf"{plugin_module}:{fn}"):
      verifiers_lib.rewards_for(["7"], examples[:1], verifiers_lib.RewardConfig(
          fn=f"{plugin_module}:{fn}", workers=1))


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "module:function"), ("no_such_module_xyz:f", "cannot import"),
    ("os:no_such_function", "no callable"),
])
def test_bad_plugin_spec_names_the_field(spec, message):
  cfg = default_config.get("copd", "micro")
  cfg.reward.fn = spec
  with pytest.raises(ValueError, match=rf"config\.reward\.fn.*{message}"):
    config_lib.validate_config(cfg)


# ----------------------------------------------------------- 13.10 inf in the config

@pytest.mark.parametrize("field", ["rl.learning_rate", "rl.opd.beta", "rl.grad_clip_norm",
                                   "sampling.temperature", "rl.opd.schedule.overlap_target"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_config_value_is_rejected_naming_the_field(field, value):
  cfg = default_config.get("copd", "micro")
  default_config.set_field(cfg, field, value)
  with pytest.raises(ValueError, match=rf"config\.{field.replace('.', '[.]')} must be a finite"):
    config_lib.validate_config(cfg)


def test_one_sample_per_prompt_and_empty_workdir_are_rejected():
  cfg = default_config.get("copd", "micro")
  cfg.rl.samples_per_prompt = 1
  with pytest.raises(ValueError, match=r"config\.rl\.samples_per_prompt"):
    config_lib.validate_config(cfg)
  cfg = default_config.get("copd", "micro")
  cfg.workdir = ""
  with pytest.raises(ValueError, match=r"config\.workdir"):
    config_lib.validate_config(cfg)


@pytest.mark.parametrize("field, value", [("rl.lr_schedule", "linear"),
                                          ("rl.lr_end_fraction", 1.5),
                                          ("model.attention_kernel", "flash")])
def test_bad_schedule_or_attention_kernel_is_rejected_naming_the_field(field, value):
  cfg = default_config.get("copd", "micro")
  default_config.set_field(cfg, field, value)
  with pytest.raises(ValueError, match=rf"{field.replace('.', '[.]')}"):
    config_lib.validate_config(cfg)


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


# ------------------------------------------- 13.10 non-finite updates, per branch

def _poison_optimizer():
  """SGD whose update is multiplied by a scale held in the optimizer state (one per
  branch once stacked): an inf scale makes that branch's new parameters non-finite while
  its loss and gradient norm stay finite."""
  import jax
  import jax.numpy as jnp
  import optax

  def init(params):
    return {"scale": jnp.ones(())}

  def update(updates, state, params=None):
    return jax.tree.map(lambda u: u * state["scale"], updates), state

  return optax.chain(optax.sgd(0.1), optax.GradientTransformation(init, update))


def test_update_with_non_finite_new_params_is_not_applied_to_that_branch_only():
  import jax
  import jax.numpy as jnp

  from copd_jax import kernels, policy_setup, sampling
  from copd_jax.models import stacked as experts
  from copd_jax.rl import objectives, rollout as trainer, rows as rows_lib, update as update_lib
  cfg = default_config.get("copd", "micro")
  s = policy_setup.build_setup(cfg)
  params = experts.init_stacked(s.model_cfg, jax.random.split(jax.random.key(4), 2))
  caps = ("text", "image")
  batches = [s.encode_prompts([tasks.make_example(c, i, seed=0, difficulty=1, **s.example_kwargs)
                               for i in range(2)]) for c in caps]
  tokens, mask, frames = trainer.stack_prompt_batches(batches)
  from tiny_model import one_device_run
  rollout = sampling.stacked_generate(one_device_run(s.model_cfg), params, s.model_cfg,
                                      tokens, mask, frames,
                                      jax.random.split(jax.random.key(0), 2),
                                      sampling.SamplingConfig(max_new_tokens=6, stop_token_ids=(2,)), 2)
  advantages = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
  rows = trainer.build_rows(tokens, mask, frames, rollout, advantages, np.zeros((2, 4)), 2)
  ucfg = rows_lib.UpdateConfig(model=s.model_cfg, loss=objectives.PolicyLossConfig(),
                              kernel=kernels.KernelConfig(backend="chunked", vocab_tile=32,
                                                          token_tile=64))
  optimizer = _poison_optimizer()
  opt_state = update_lib.init_optimizer_state(optimizer, params)
  opt_state = (opt_state[0], {"scale": jnp.array([1.0, jnp.inf])})  # branch 1 blows up
  new_params, new_opt, metrics = update_lib.update(params, opt_state, None, rows, None, run=one_device_run(ucfg.model), ucfg=ucfg,
                                                optimizer=optimizer, distil=False)
  assert np.isfinite(np.asarray(metrics["loss"])).all()
  assert np.isfinite(np.asarray(metrics["grad_norm"])).all()
  np.testing.assert_array_equal(np.asarray(metrics["update_applied"]), [1.0, 0.0])
  for old, new in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
    np.testing.assert_array_equal(np.asarray(new[1]), np.asarray(old[1]))  # kept
    assert np.isfinite(np.asarray(new)).all()
  assert any(not np.array_equal(np.asarray(n[0]), np.asarray(o[0]))  # branch 0 updated
             for o, n in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)))


def _poison_advantages(monkeypatch, bad):
  """bad: {step: [branch, ...]}: those branches' GRPO advantages are NaN on that step."""
  from copd_jax.rl import rollout as trainer
  real, calls = trainer.group_advantages, []

  def poisoned(rewards, samples, scale_by_std):
    advantages, zero = real(rewards, samples, scale_by_std)
    advantages = np.array(advantages)
    for branch in bad.get(len(calls), ()):
      advantages[branch] = np.nan
    calls.append(1)
    return advantages, zero
  monkeypatch.setattr(trainer, "group_advantages", poisoned)


@pytest.fixture(scope="module")
def micro_base():
  import jax

  from copd_jax import policy_setup
  from copd_jax.models import decoder as model_lib
  cfg = default_config.get("experts", "micro")
  s = policy_setup.build_setup(cfg)
  return s, model_lib.init_params(s.model_cfg, jax.random.key(0))


def _experts_cfg(tmp_path, **rl):
  cfg = default_config.get("experts", "micro")
  cfg.workdir = str(tmp_path / "experts")
  cfg.rl.update(rl)
  cfg.rl.loss.entropy_coef = 0.01  # rewards of a random policy are 0: make params move
  config_lib.validate_config(cfg)
  return cfg


def _run(cfg, micro_base):
  from copd_jax.rl import methods
  from copd_jax.run_log import MetricsWriter
  s, params = micro_base
  writer = MetricsWriter(cfg.workdir)
  try:
    return methods.run_rl_method(cfg, s, params, writer)
  finally:
    writer.close()


def test_summary_reports_applied_and_skipped_updates(tmp_path, micro_base, monkeypatch):
  _poison_advantages(monkeypatch, {0: [1]})  # step 1 of 2: branch 'image' only
  summary = _run(_experts_cfg(tmp_path), micro_base)
  assert summary["steps"] == 2
  assert summary["optimizer_steps"] == 1  # step 1 skipped a branch's update
  assert summary["updates"] == {"experts": {
      "text": {"applied": 2, "skipped": 0}, "image": {"applied": 1, "skipped": 1},
      "video": {"applied": 2, "skipped": 0}}}


def test_total_non_finite_budget_stops_a_run_that_never_fails_in_a_row(tmp_path, micro_base,
                                                                      monkeypatch):
  from copd_jax import train_checkpoint
  _poison_advantages(monkeypatch, {0: [1], 2: [1], 4: [2]})  # never twice in a row
  cfg = _experts_cfg(tmp_path, steps=6, max_nonfinite_steps_in_row=2,
                     max_nonfinite_steps_total=3)
  with pytest.raises(train_checkpoint.NonFiniteTrainingError,
                     match=r"3 non-finite updates in total.*last: step 5, branch\(es\) \['video'\]"):
    _run(cfg, micro_base)


# ----------------------------------------------- 13.9 checkpoint checksums on restore

def _stage_state():
  import jax
  import jax.numpy as jnp
  import optax
  # Random values do not compress, so their bytes lie verbatim in orbax's data file.
  bits = np.random.default_rng(0).integers(0, 2**32, size=(2, 64, 64), dtype=np.uint32)
  kernel = (bits & np.uint32(0xBFFFFFFF)).view(np.float32)  # exponent < 128: finite
  p = {"dense": {"kernel": jnp.asarray(kernel)},
       "norm": {"scale": jnp.full((2, 4), 0.5)}}
  opt = optax.adam(1e-2)
  return {"params": p, "opt_state": jax.vmap(opt.init)(p)}


def _stage_ckpt(root, fallback=False):
  from ml_collections import ConfigDict

  from copd_jax import train_checkpoint as tc
  opts = ConfigDict(dict(every_steps=1, max_to_keep=3, async_save=False, resume=True,
                         save_on_sigterm=True, fallback_on_corrupt=fallback))
  run = tc.RunCheckpoints(str(root), opts, method="copd", num_experts=2, seed=0,
                          config_json={})
  return run.for_stage("copd", ["text", "image"])


def _host(step):
  from copd_jax import train_checkpoint as tc
  return tc.HostState(stage_step=step, global_step=step, finished=False, numpy_rng={},
                      schedule={}, last_overlap=None, streams={})


def _flip_bytes_of_array(step_dir, value: np.ndarray, count=1):
  """Flips `count` bytes inside the stored bytes of the array whose raw contents are
  `value` (found by searching the checkpoint's data files for its bytes)."""
  needle = value.tobytes()[4096:4160]  # 64 bytes from the middle of the array
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(dirpath, name)
      data = bytearray(open(path, "rb").read())
      at = data.find(needle)
      if at >= 0:
        for j in range(count):
          data[at + 8 * j] ^= 0x10
        open(path, "wb").write(bytes(data))
        return path
  raise AssertionError("array bytes not found uncompressed in the checkpoint")


@pytest.mark.parametrize("count", [1, 8])
def test_flipped_byte_in_a_checkpoint_names_the_array(tmp_path, count):
  import jax
  from orbax.checkpoint import utils as ocp_utils

  from copd_jax import train_checkpoint as tc
  state = _stage_state()
  ck = _stage_ckpt(tmp_path)
  ck.save(state, _host(1), ["text", "image"])
  ck.close()
  _flip_bytes_of_array(os.path.join(ck.directory, "1"), np.asarray(state["params"]["dense"]["kernel"]),
                       count)
  abstract = jax.tree.map(ocp_utils.to_shape_dtype_struct, state)
  with pytest.raises(tc.CheckpointCorruptError,
                     match=r"1/?.* is corrupt.*\['params'\]\['dense'\]\['kernel'\]"):
    _stage_ckpt(tmp_path).restore_latest(abstract)


def test_corrupt_newest_checkpoint_falls_back_only_when_asked(tmp_path):
  import jax
  from orbax.checkpoint import utils as ocp_utils

  from copd_jax import train_checkpoint as tc
  state = _stage_state()
  newer = jax.tree.map(lambda x: -x, state)  # as incompressible as `state`
  ck = _stage_ckpt(tmp_path)
  ck.save(state, _host(1), ["text", "image"])
  ck.save(newer, _host(2), ["text", "image"])
  ck.close()
  _flip_bytes_of_array(os.path.join(ck.directory, "2"), np.asarray(newer["params"]["dense"]["kernel"]))
  abstract = jax.tree.map(ocp_utils.to_shape_dtype_struct, state)
  with pytest.raises(tc.CheckpointCorruptError):
    _stage_ckpt(tmp_path).restore_latest(abstract)
  restored, host = _stage_ckpt(tmp_path, fallback=True).restore_latest(abstract, True)
  assert host.stage_step == 1
  np.testing.assert_array_equal(np.asarray(restored["params"]["dense"]["kernel"]),
                                np.asarray(state["params"]["dense"]["kernel"]))


def test_checksums_ignore_sharding():
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from copd_jax import train_checkpoint as tc
  state = _stage_state()
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
  sharded = jax.tree.map(lambda x: jax.device_put(
      x, NamedSharding(mesh, P("a", "b") if x.ndim == 3 else P("a"))), state["params"])
  assert tc.array_checksums(sharded) == tc.array_checksums(state["params"])
  changed = dict(state["params"], norm={"scale": state["params"]["norm"]["scale"].at[1, 3].set(0.25)})
  assert tc.checksum_mismatches(tc.array_checksums(state["params"]), changed) == \
      ["['norm']['scale']"]


# ------------------------------------------- 13.6 a full disk; SIGTERM in bounded time

class _FullDisk:
  """A file object whose writes put `room` more bytes on disk, then fail with ENOSPC."""

  def __init__(self, f, room=10):
    self._f, self._room = f, room

  def write(self, text):
    self._f.write(text[:self._room])
    self._f.flush()
    self._room = 0
    raise OSError(errno.ENOSPC, "No space left on device")

  def __getattr__(self, name):
    return getattr(self._f, name)


def test_metrics_log_on_a_full_disk_raises_naming_the_file(tmp_path):
  from copd_jax.run_log import LogWriteError, MetricsWriter
  w = MetricsWriter(str(tmp_path))
  w.write(1, {"a": 1.0})
  w._jsonl = _FullDisk(w._jsonl)
  with pytest.raises(LogWriteError, match=r"No space left.*metrics\.jsonl"):
    w.write(2, {"a": 2.0})
  w.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
  assert [json.loads(line) for line in lines] == [{"step": 1, "a": 1.0}]  # no partial line


def test_tensorboard_write_error_raises_instead_of_blocking(tmp_path, monkeypatch):
  """tensorboardX's writer thread died on ENOSPC and the next write blocked forever on
  its full queue. Writes run in a thread here so that a hang fails the test."""
  import threading

  from tensorboardX import event_file_writer

  from copd_jax.run_log import LogWriteError, MetricsWriter
  w = MetricsWriter(str(tmp_path))

  def full(self, event_str):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(event_file_writer.EventsWriter, "_write_serialized_event", full)
  raised = []

  def write_many():
    try:
      for step in range(100):
        w.write(step, {"a": 1.0, "b": 2.0})
    except LogWriteError as e:
      raised.append(str(e))
  thread = threading.Thread(target=write_many, daemon=True)
  thread.start()
  thread.join(60)
  assert not thread.is_alive(), "a write blocked after the event writer failed"
  assert raised and "No space left" in raised[0] and "events.out.tfevents" in raised[0]


def _tiny_fs_available() -> bool:
  probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                         capture_output=True) if sys.platform.startswith("linux") else None
  return probe is not None and probe.returncode == 0


@pytest.mark.skipif(not _tiny_fs_available(), reason="needs unshare -rm and tmpfs mounts")
def test_a_real_full_filesystem_stops_the_writer_with_the_path(tmp_path):
  mount = tmp_path / "tiny"
  mount.mkdir()
  code = textwrap.dedent(f"""
      from copd_jax.run_log import LogWriteError, MetricsWriter
      w = MetricsWriter({str(mount / 'run')!r})
      try:
        for step in range(10**6):
          w.write(step, {{"a": 1.0, "b": 2.0}})
      except LogWriteError as e:
        print("ERROR", e)
      w.close()
  """)
  out = subprocess.run(["unshare", "-rm", "sh", "-c",
                        f'mount -t tmpfs -o size=64k tmpfs {mount} && exec {sys.executable} -c "$0"',
                        code], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ERROR [Errno 28]" in out.stdout and str(mount / "run") in out.stdout, out.stdout


def test_full_disk_during_training_stops_with_the_path_and_keeps_the_checkpoint(
    tmp_path, micro_base):
  from copd_jax import train_checkpoint
  from copd_jax.run_log import MetricsWriter

  class DiskFillsAtStep(MetricsWriter):
    fill_at = 2

    def write(self, step, scalars):
      if step >= self.fill_at and not isinstance(self._jsonl, _FullDisk):
        self._jsonl = _FullDisk(self._jsonl)
      super().write(step, scalars)

  from copd_jax.rl import methods
  cfg = _experts_cfg(tmp_path, steps=3)
  cfg.checkpoint.every_steps = 1
  s, params = micro_base
  writer = DiskFillsAtStep(cfg.workdir)
  with pytest.raises(train_checkpoint.StorageError) as caught:
    methods.run_rl_method(cfg, s, params, writer)
  writer.close()
  message = str(caught.value)
  assert "metrics.jsonl" in message and "No space left" in message
  newest = os.path.join(cfg.workdir, "checkpoints", "experts", "1")
  assert f"Newest complete checkpoint: {os.path.abspath(newest)}" in message
  assert os.path.isdir(newest)


def test_sigterm_ends_a_stuck_process_in_bounded_time():
  """The run is stuck in a write that never returns (the old tensorboardX hang): SIGTERM
  must still end the process once the grace period is over."""
  code = textwrap.dedent("""
      import queue
      from copd_jax import train_checkpoint
      with train_checkpoint.stop_on_signals(True, grace_s=1.0):
        print("ready", flush=True)
        q = queue.Queue(maxsize=1)
        q.put(1)
        q.put(2)  # blocks forever
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)
  assert proc.stdout.readline().strip() == "ready"
  proc.send_signal(signal.SIGTERM)
  try:
    _, err = proc.communicate(timeout=600)  # ends after 1 s; generous under load
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("SIGTERM did not end the process")
  assert proc.returncode == 128 + signal.SIGTERM
  assert "did not reach a step boundary within 1 s" in err


def test_second_sigterm_ends_the_process_at_once():
  code = textwrap.dedent("""
      import os, signal, time
      from copd_jax import train_checkpoint
      with train_checkpoint.stop_on_signals(True, grace_s=3600.0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        print("flagged", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3600)
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, cwd=REPO)  # ends at once; generous under load
  assert out.stdout.strip() == "flagged" and out.returncode == 128 + signal.SIGTERM
  assert "second signal" in out.stderr


# ------------------------------------------- 13.11 HF checkpoint and chat template errors

HF_FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf", "qwen3_tiny")


def _copy_checkpoint(tmp_path, name="untied_f32"):
  import shutil
  target = tmp_path / name
  shutil.copytree(os.path.join(HF_FIXTURES, name), target)
  return target


def test_huge_layer_count_in_config_fails_on_headers_first(tmp_path):
  from copd_jax.models import hf_checkpoint
  ckpt = _copy_checkpoint(tmp_path)
  config = json.loads((ckpt / "config.json").read_text())
  config["num_hidden_layers"] = 10**8
  (ckpt / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_checkpoint.HFCheckpointError,
                     match=r"config\.json: 'num_hidden_layers' is 100000000, but the "
                           r"safetensors files hold \d+ layers"):
    hf_checkpoint.load_qwen3(str(ckpt))


def test_non_utf8_hf_config_names_the_file(tmp_path):
  from copd_jax.models import hf_checkpoint
  ckpt = _copy_checkpoint(tmp_path)
  (ckpt / "config.json").write_bytes(b'{"model_type": "qwen3\xff"}')
  with pytest.raises(hf_checkpoint.HFCheckpointError, match=r"config\.json: not UTF-8"):
    hf_checkpoint.read_hf_config(str(ckpt))


def test_nan_weight_in_hf_checkpoint_names_the_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file

  from copd_jax.models import hf_checkpoint
  ckpt = _copy_checkpoint(tmp_path)
  tensors = load_file(str(ckpt / "model.safetensors"))
  name = "model.layers.0.mlp.up_proj.weight"
  tensors[name] = tensors[name].copy()
  tensors[name][1, 2] = np.nan
  save_file(tensors, str(ckpt / "model.safetensors"))
  with pytest.raises(hf_checkpoint.HFCheckpointError,
                     match=rf"model\.safetensors: tensor '{re_escape(name)}' holds 1 NaN/inf"):
    hf_checkpoint.load_qwen3(str(ckpt))


def re_escape(text):
  import re
  return re.escape(text)


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "longer than"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
    ("{{ 'x' * 10**9 }}", "builds a sequence"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}{{ ns.s }}", "builds a sequence"),
    ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "output exceeds"),
    ("{{ 7 ** 123456789 }}", "power"),
    ("{{ messages[0].content.no_such_method() }}", "failed"),
])
def test_chat_template_that_loops_recurses_or_grows_raises_one_error(tmp_path, template, message):
  import shutil

  from copd_jax.data.chat_template import ChatTemplateError
  from copd_jax.data.hf_tokenizer import HFTokenizer
  directory = tmp_path / "tok"
  shutil.copytree(os.path.join(HF_FIXTURES, "tokenizer"), directory)
  (directory / "chat_template.jinja").write_text(template)
  tok = HFTokenizer(str(directory))
  with pytest.raises(ChatTemplateError, match=message):
    tok.render_chat([{"role": "user", "content": "hi"}])


def _truncate_state_files(step_dir):
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(dirpath, name)
      if os.path.getsize(path) > 1000:
        with open(path, "r+b") as f:
          f.truncate(500)


def test_failed_restore_is_one_short_message_and_closes_the_manager(tmp_path, micro_base,
                                                                    monkeypatch):
  """A failed restore printed ~100 tracebacks (tensorstore's spec dump, then orbax threads
  left running at exit) that buried the real message."""
  from copd_jax import checkpoint, train_checkpoint
  cfg = _experts_cfg(tmp_path, steps=1)
  _run(cfg, micro_base)
  _truncate_state_files(os.path.join(cfg.workdir, "checkpoints", "experts", "1"))
  closed = []
  real_close = train_checkpoint.StageCheckpointer.close
  monkeypatch.setattr(train_checkpoint.StageCheckpointer, "close",
                      lambda self: (closed.append(self.directory), real_close(self)))
  with pytest.raises(checkpoint.CheckpointMismatchError) as caught:
    _run(cfg, micro_base)
  message = str(caught.value)
  assert "cannot restore training state" in message and "experts/1" in message
  assert len(message.splitlines()) == 1 and "TensorStore({" not in message
  assert closed == [os.path.join(os.path.abspath(cfg.workdir), "checkpoints", "experts")]
