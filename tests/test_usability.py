"""Issue 29: a researcher's run on their own data -- per-source columns and weights, no
field that silently does nothing, several weighted rewards, system prompts and chat-template
arguments, what a pass@k pass is, the export command, and the small frictions."""
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

import fixture_configs
import paths
from copd_jax.config_lib import spec_of
from copd_jax import cli, config_lib, default_config, export, main, policy_setup, run_dir
from copd_jax.data import examples as examples_lib, reward_fns, streams, verifiers
from copd_jax.models import decoder as model_lib, stacked as experts
from copd_jax.rl import evaluation

REPO = paths.REPO
QWEN3_CHAT = os.path.join(paths.FIXTURES, "hf", "qwen3_chat")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def hf_config(arg="micro"):
  """configs/hf_copd.py:<arg> on the committed fixtures."""
  return fixture_configs.load("hf_copd", arg)


# configs/hf_copd.py:micro's required checkpoint and record files: the committed fixtures.
HF_FIXTURE_FLAGS = fixture_configs.fixture_flags("hf_copd", ("math", "science"))


def run_cli(module, *args, cwd):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=ENV,
                        capture_output=True, text=True, timeout=600)


def error_lines(result) -> list[str]:
  return [l for l in result.stderr.splitlines() if l.startswith("error:")]


# ----------------------------------------------------------- 2. per-source data


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(path)


def two_sources(tmp_path) -> dict:
  """Source 'gsm' names its columns question / final_answer, source 'aops' problem /
  result: one mapping for both could read neither."""
  gsm = write_jsonl(tmp_path / "gsm.jsonl", [
      {"question": f"gsm {i}: what is {i} + 1?", "final_answer": str(i + 1),
       "verifier": "integer"} for i in range(20)])
  aops = write_jsonl(tmp_path / "aops.jsonl", [
      {"problem": f"aops {i}: what is {i} * 2?", "result": str(2 * i), "verifier": "integer"}
      for i in range(20)])
  held = write_jsonl(tmp_path / "eval.jsonl", [
      {"prompt": f"eval {i}: {i} + 0?", "answer": str(i), "verifier": "integer"} for i in range(3)])
  return {
      "gsm": dict(path=gsm, split="train", domain="math", weight=3.0,
                  columns={"prompt": "question", "answer": "final_answer"}),
      "aops": dict(path=aops, split="train", domain="math", weight=1.0,
                   columns={"prompt": "problem", "answer": "result"}),
      "held": dict(path=held, split="eval", domain="math"),
      "sci": dict(path=held, split="train", domain="science"),
      "sci_eval": dict(path=held, split="eval", domain="science"),
  }


def sources_config(tmp_path):
  cfg = hf_config()
  cfg.data.train_files, cfg.data.eval_files = {}, {}
  cfg.data.sources = two_sources(tmp_path)
  return cfg


def test_two_sources_with_different_columns_are_mixed_by_weight(tmp_path):
  cfg = sources_config(tmp_path)
  config_lib.validate_config(cfg)
  setup = policy_setup.build_setup(spec_of(cfg))
  stream = streams.capability_dataset(spec_of(cfg), "math", setup.example_kwargs, seed=5)
  drawn = [stream[i] for i in range(400)]
  from_gsm = [ex for ex in drawn if ex.question.startswith("gsm ")]
  from_aops = [ex for ex in drawn if ex.question.startswith("aops ")]
  assert len(from_gsm) + len(from_aops) == 400  # every prompt read through its own columns
  # Each source's answer column became the reference: gsm i -> i + 1, aops i -> 2 i.
  for ex in from_gsm:
    assert ex.answer == str(int(ex.question.split()[1][:-1]) + 1)
  for ex in from_aops:
    assert ex.answer == str(2 * int(ex.question.split()[1][:-1]))
  # Weights 3 : 1 -> three quarters of the prompts from gsm.
  assert abs(len(from_gsm) / 400 - 0.75) <= 0.02
  # The held-out set is the eval source, read with its own (default) columns.
  held = policy_setup.held_out_sets(spec_of(cfg), setup)["math"]
  assert [ex.question for ex in held] == ["eval 0: 0 + 0?", "eval 1: 1 + 0?"]


def test_source_errors_name_the_field(tmp_path):
  cfg = sources_config(tmp_path)
  cfg.data.sources.gsm.weight = 0.0
  with pytest.raises(ValueError, match=r"config\.data\.sources\.gsm\.weight must be a positive"):
    config_lib.validate_config(cfg)
  cfg = sources_config(tmp_path)
  cfg.data.sources.aops.columns.answr = "result"
  with pytest.raises(ValueError, match=r"config\.data\.sources\.aops\.columns maps 'answr'"):
    config_lib.validate_config(cfg)
  cfg = sources_config(tmp_path)
  del cfg.data.sources["held"]
  with pytest.raises(ValueError, match=r"config\.data\.sources has no 'eval' source for \['math'\]"):
    config_lib.validate_config(cfg)
  # The old single mapping next to per-source columns: a migration error, not a guess.
  cfg = sources_config(tmp_path)
  cfg.data.columns = {"prompt": "question"}
  with pytest.raises(ValueError, match=r"config\.data\.columns is per source"):
    config_lib.validate_config(cfg)


def test_old_single_column_configs_still_work(tmp_path):
  cfg = hf_config()
  rows = [{"q": f"old {i}?", "a": str(i), "verifier": "integer"} for i in range(4)]
  path = write_jsonl(tmp_path / "old.jsonl", rows)
  cfg.data.train_files = {"math": path, "science": path}
  cfg.data.eval_files = {"math": path, "science": path}
  cfg.data.columns = {"prompt": "q", "answer": "a"}
  config_lib.validate_config(cfg)
  setup = policy_setup.build_setup(spec_of(cfg))
  stream = streams.capability_dataset(spec_of(cfg), "math", setup.example_kwargs, seed=0)
  assert sorted(stream[i].question for i in range(4)) == [f"old {i}?" for i in range(4)]


def test_dotted_source_overrides_and_structured_values_in_the_run_name(tmp_path):
  config_file = tmp_path / "my_data.py"
  config_file.write_text(
      "import importlib.util, json\n"
      f"spec = importlib.util.spec_from_file_location('hf', {os.path.join(REPO, 'configs', 'hf_copd.py')!r})\n"
      "hf = importlib.util.module_from_spec(spec); spec.loader.exec_module(hf)\n"
      f"SOURCES = json.loads({json.dumps(json.dumps(two_sources(tmp_path)))})\n"
      "def get_config():\n"
      "  c = hf.get_config('micro')\n"
      f"  c.init.hf_checkpoint, c.init.hf_tokenizer = {fixture_configs.QWEN3_TINY!r}, "
      f"{fixture_configs.QWEN3_TINY_TOKENIZER!r}\n"
      "  c.data.train_files, c.data.eval_files, c.data.sources = {}, {}, SOURCES\n"
      "  return c\n")
  result = run_cli("copd_jax.main", f"--config={config_file}", "--config.data.sources.gsm.weight=2.5",
                   "--config.data.sources.aops.columns.prompt=problem", "--dry_run", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
  assert printed["data"]["sources"]["gsm"]["weight"] == 2.5
  assert re.fullmatch(r"runs/hf_copd_micro-data\.sources\.gsm\.weight=2\.5-[0-9a-f]{8}",
                      printed["workdir"])  # an override equal to the file's is no change
  # A structured value (a whole mapping) reads as a short hash, not its mangled text.
  cfg = hf_config()
  name = run_dir.run_name(cli.as_json(cfg), {"data.chat_template_kwargs": {"enable_thinking": False}},
                          prefix="hf_copd")
  assert re.fullmatch(r"hf_copd-data\.chat_template_kwargs=h[0-9a-f]{6}-[0-9a-f]{8}", name)


# ----------------------------------------------------------- 3. no silent fields


def test_hf_config_rejects_an_overridden_architecture_field(tmp_path):
  result = run_cli("copd_jax.main", f"--config={REPO}/configs/hf_copd.py:micro", *HF_FIXTURE_FLAGS,
                   "--config.model.d_model=4096", "--dry_run", cwd=tmp_path)
  assert result.returncode == 1
  [line] = error_lines(result)
  assert "config.model.d_model is fixed by the checkpoint" in line
  assert "its config.json gives 48" in line  # the fixture checkpoint's hidden_size
  assert os.listdir(tmp_path) == []  # no run directory started
  # The compute dtype is still the config's to set.
  ok = run_cli("copd_jax.main", f"--config={REPO}/configs/hf_copd.py:micro", *HF_FIXTURE_FLAGS,
               "--config.model.dtype=bfloat16", "--dry_run", cwd=tmp_path)
  assert ok.returncode == 0, ok.stderr[-2000:]


def test_help_lists_only_the_fields_that_apply(tmp_path):
  hf = run_cli("copd_jax.main", f"--config={REPO}/configs/hf_copd.py:micro", *HF_FIXTURE_FLAGS, "--help", cwd=tmp_path)
  assert hf.returncode == 0
  listed = {l.split(" = ")[0].strip() for l in hf.stdout.splitlines() if " = " in l}
  assert "model.dtype" in listed and "data.max_prompt_len" in listed
  assert not {"model.d_model", "model.num_layers", "warm_start.steps"} & listed
  toy = run_cli("copd_jax.main", f"--config={REPO}/configs/copd.py:micro", "--help", cwd=tmp_path)
  assert any(l.strip().startswith("model.d_model = ") for l in toy.stdout.splitlines())


def resolve(spec, **overrides):
  cfg = cli.load_config_file(os.path.join(REPO, spec))
  for field, value in overrides.items():
    cli.set_field(cfg, field, value)
  return cli.resolve(cfg, os.path.join(REPO, spec), set(overrides))


def test_operational_fields_never_rename_a_run():
  plain = resolve("configs/copd.py:micro")
  same = resolve("configs/copd.py:micro", **{
      "log.completions": 0, "log.completions_every": 3, "log.wandb_project": "other",
      "rl.log_every": 5, "warm_start.log_every": 1, "reward.workers": 1,
      "data.reader": "datasets", "model.attention_kernel": "splash",
      "model.attention_block": 8})
  assert same.workdir == plain.workdir
  assert resolve("configs/copd.py:micro", **{"rl.steps": 9}).workdir != plain.workdir


# --------------------------------------------- 4. rewards as a list, chat prompts


PLUGIN = '''
def has_marker(response, example):
  return 1.0 if "#" in response else 0.0
'''


def test_weighted_reward_list_and_per_function_logs(tmp_path, monkeypatch):
  (tmp_path / "usability_rewards.py").write_text(PLUGIN)
  monkeypatch.syspath_prepend(str(tmp_path))
  fns = reward_fns.parse_fns("verifier,usability_rewards:has_marker", (1.0, 0.25))
  assert [(f.name, f.weight) for f in fns] == [("verifier", 1.0), ("has_marker", 0.25)]
  examples = [examples_lib.Example("text", "q", "7", "") for _ in range(3)]
  responses = ["1+6=7#7", "1+5=6#6", "seven"]  # right+marked, wrong+marked, neither
  config = verifiers.RewardConfig(workers=1)
  total, per_fn, _ = reward_fns.score(responses, examples, fns, config)
  np.testing.assert_allclose(per_fn["verifier"], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(per_fn["has_marker"], [1.0, 1.0, 0.0])
  np.testing.assert_allclose(total, [1.25, 0.25, 0.0])
  # Logged per branch: rows 0, 1 are branch 0's and row 2 branch 1's of a [2, 2] batch
  # (row 3 belongs to another process).
  means = reward_fns.branch_means(per_fn, np.array([0, 1, 2]), branches=2, rows=2)
  np.testing.assert_allclose(means["reward_fn/has_marker"], [1.0, 0.0])
  np.testing.assert_allclose(means["reward_fn/verifier"], [0.5, 0.0])


@pytest.mark.parametrize("fns, weights, message", [
    ("verifier,nomodule", (), r"'module:function'"),
    ("verifier", (1.0, 2.0), r"one weight per config\.reward\.fns entry"),
    ("verifier,verifier", (), r"must not repeat"),
    ("verifier", (float("nan"),), r"finite"),
])
def test_reward_list_errors_name_the_field(fns, weights, message):
  cfg = default_config.get("copd", "micro")
  cfg.reward.fns, cfg.reward.weights = fns, weights
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(cfg)


def qwen3_template_config(**data):
  cfg = hf_config()
  cfg.init.hf_tokenizer = QWEN3_CHAT  # a copy of Qwen3's chat template (enable_thinking logic)
  cfg.data.max_prompt_len = 128  # the fixture records with a system message
  cfg.data.update(data)
  return cfg


def test_enable_thinking_false_renders_through_a_qwen3_template():
  cfg = qwen3_template_config(chat_template_kwargs={"enable_thinking": False},
                              system_prompt="Answer with a number.")
  config_lib.validate_config(cfg)
  tokenizer = policy_setup.build_setup(spec_of(cfg)).tokenizer
  example = examples_lib.Example("math", "What is 2+2?", "4", modality="text", verifier="integer")
  ids = examples_lib.prompt_token_ids(example, tokenizer, 0)
  # Qwen3's template with enable_thinking=False closes an empty think block after the
  # generation prompt; the system message comes first.
  expected = ("<|im_start|>system\nAnswer with a number.<|im_end|>\n"
              "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
              "<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert ids == tokenizer.encode(expected)
  # Without the argument the template leaves thinking on: no think block in the prompt.
  thinking = policy_setup.build_setup(spec_of(qwen3_template_config())).tokenizer
  assert examples_lib.prompt_token_ids(example, thinking, 0) == thinking.encode(
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_fields_need_a_checkpoint_template():
  cfg = default_config.get("copd", "micro")
  cfg.data.system_prompt = "Be brief."
  with pytest.raises(ValueError, match=r"config\.data\.system_prompt needs config\.init\.hf_checkpoint"):
    config_lib.validate_config(cfg)


# ------------------------------------------------------- 5. what a pass@k pass is


def test_passing_counts_use_the_threshold():
  rewards = np.array([[1.0, 0.5], [0.5, 0.0]])
  assert evaluation.passing_counts(rewards).tolist() == [1, 0]
  assert evaluation.passing_counts(rewards, 0.5).tolist() == [2, 1]


def test_pass_at_k_with_partial_credit(monkeypatch):
  """A partial-credit reward (0.5 on every sample) is no pass at the default threshold 1.0:
  pass@4 is 0 for a model that never answers fully right; at threshold 0.5 every sample
  passes and pass@4 is 1."""
  cfg = default_config.get("copd", "micro")
  setup = policy_setup.build_setup(spec_of(cfg))
  stacked = experts.broadcast_params(model_lib.init_params(setup.model_cfg, jax.random.key(0)), 1)
  eval_sets = {"text": policy_setup.held_out_sets(spec_of(cfg), setup)["text"][:2]}
  monkeypatch.setattr(verifiers, "rewards_for",
                      lambda responses, examples, *a, **k: np.full(len(responses), 0.5, np.float32))
  from copd_jax.rl import methods
  kwargs = dict(run=methods.run_sharding(spec_of(cfg), setup.model_cfg), max_new_tokens=4,
                batch_size=8, pass_samples=4, pass_k=(1, 4))
  strict = evaluation.evaluate_stacked(stacked, setup, eval_sets, **kwargs)
  np.testing.assert_allclose(strict["pass@4/text"], [0.0])
  np.testing.assert_allclose(strict["pass@1/text"], [0.0])
  np.testing.assert_allclose(strict["accuracy/text"], [0.5])  # greedy accuracy: the mean reward
  lenient = evaluation.evaluate_stacked(stacked, setup, eval_sets, pass_threshold=0.5, **kwargs)
  np.testing.assert_allclose(lenient["pass@4/text"], [1.0])
  cfg.eval.pass_samples, cfg.eval.pass_k, cfg.eval.pass_threshold = 4, (1,), 0.5
  assert evaluation.pass_at_k_kwargs(spec_of(cfg))["pass_threshold"] == 0.5


# ------------------------------------------------------------------ 6. export


def toy_run_policy(monkeypatch):
  """load_run_policy of a toy run (a model with a vision tower), without training one."""
  cfg = default_config.get("copd", "micro")
  model_cfg = policy_setup.build_setup(spec_of(cfg)).model_cfg
  params = model_lib.init_params(model_cfg, jax.random.key(0))
  monkeypatch.setattr(export, "load_run_policy", lambda workdir, branch="merged": (cfg, model_cfg, params))


def test_existing_export_directory_is_refused_unless_overwrite(tmp_path, monkeypatch):
  out = tmp_path / "exported"
  out.mkdir()
  (out / "keep.txt").write_text("an earlier export")
  with pytest.raises(ValueError, match=r"--out=.*exported already exists.*--overwrite"):
    export.export_run(str(tmp_path / "run"), str(out))
  assert (out / "keep.txt").read_text() == "an earlier export"
  toy_run_policy(monkeypatch)
  # A toy run's model has a vision tower: the message names the command-line flag.
  with pytest.raises(ValueError, match=r"pass --language_model_only"):
    export.export_run(str(tmp_path / "run"), str(out), overwrite=True)
  assert (out / "keep.txt").exists()  # a failed export changed nothing
  export.export_run(str(tmp_path / "run"), str(out), overwrite=True, language_model_only=True,
                    dtype="float32")
  names = sorted(os.listdir(out))
  assert "keep.txt" not in names and "model.safetensors" in names and "config.json" in names
  for name in names:
    assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or ".replaced-" in p]


def test_export_flags_parse(tmp_path):
  result = run_cli("copd_jax.export", "--out=x", "--language_model_only", "--overwrite",
                   f"--workdir={tmp_path / 'nowhere'}", cwd=tmp_path)
  assert result.returncode == 1
  assert error_lines(result) == [
      f"error: {tmp_path / 'nowhere' / 'config.json'} not found: is {tmp_path / 'nowhere'} a "
      "copd_jax.main workdir?  (--traceback for details)"]


# --------------------------------------------------------- 7. summary and frictions


def test_summary_reward_fields_from_the_training_log(tmp_path):
  path = tmp_path / "metrics.jsonl"
  write_jsonl(path, [
      {"step": 0, "eval/text/accuracy/overall": 0.2},
      {"step": 1, "train/text/reward/native": 0.25, "train/video/reward/native": 0.5},
      {"step": 2, "train/text/reward/native": 0.5, "train/video/reward/native": 0.5},
      {"step": 3, "train/text/reward/native": 0.75, "train/video/reward/native": 1.0},
      {"step": 3, "final/text/accuracy/overall": 0.4}])
  assert main.training_reward_ends(str(path)) == {"reward_first_step": 0.375,
                                                 "reward_last_step": 0.875}
  assert main.training_reward_ends(str(tmp_path / "none.jsonl")) == {}


def test_rerunning_a_finished_run_keeps_its_train_seconds(tmp_path):
  cfg = default_config.get("copd", "micro")
  cfg.workdir = str(tmp_path)
  (tmp_path / "summary.json").write_text(json.dumps({"train_seconds": 188.9, "steps": 4}))
  assert main.keep_finished_train_seconds(cfg, {"train_seconds": 6.5, "steps": 4})["train_seconds"] == 188.9
  # More steps (the run was extended) or a fresh start: this run's own time.
  assert main.keep_finished_train_seconds(cfg, {"train_seconds": 6.5, "steps": 6})["train_seconds"] == 6.5
  cfg.checkpoint.resume = False
  assert main.keep_finished_train_seconds(cfg, {"train_seconds": 6.5, "steps": 4})["train_seconds"] == 6.5


def test_preset_typo_is_one_line(tmp_path):
  result = run_cli("copd_jax.main", f"--config={REPO}/configs/copd.py:mikro", "--dry_run", cwd=tmp_path)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"error: flag --config={REPO}/configs/copd.py:mikro: unknown config preset 'mikro'; use "
      "one of toy, micro, demo"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_dry_run_with_wandb_needs_wandb(tmp_path):
  result = run_cli("copd_jax.main", f"--config={REPO}/configs/copd.py:micro",
                   "--config.log.wandb=True", "--dry_run", cwd=tmp_path)
  assert result.returncode == 1
  [line] = error_lines(result)
  assert "config.log.wandb needs the wandb package" in line
