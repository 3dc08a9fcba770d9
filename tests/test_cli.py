"""Issue 15 items 1-4: no silent fixture defaults or sampling mismatches, run names, and the
command line (--help, --dry_run, one-line errors, comma capability lists)."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import typing

import pytest

import fixture_configs
import paths
from copd_jax import cli, config_lib, default_config, run_dir, run_spec

REPO = paths.REPO
FIXTURE_TOKENIZER = os.path.join(paths.FIXTURES, "hf", "qwen3_tiny", "tokenizer")
FIXTURE_DATA = os.path.join(paths.FIXTURES, "data")
# A Qwen3-4B-shaped config.json (only read by validation; no weights needed for it).
QWEN3_4B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rope_theta": 1000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "eos_token_id": 151645}


def hf_config(arg="micro"):
  """configs/hf_copd.py:<arg> on the committed fixtures."""
  return fixture_configs.load("hf_copd", arg)


def real_checkpoint(tmp_path, with_tokenizer=False) -> str:
  directory = tmp_path / "Qwen3-4B"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(QWEN3_4B_CONFIG))
  if with_tokenizer:
    for name in os.listdir(FIXTURE_TOKENIZER):
      shutil.copy(os.path.join(FIXTURE_TOKENIZER, name), directory / name)
  return str(directory)


def user_data(tmp_path) -> dict:
  """Copies of the fixture records outside tests/fixtures: the user's own files."""
  out = {}
  for name in ("math_train.jsonl", "math_eval.jsonl", "science_train.parquet",
               "science_eval.parquet"):
    shutil.copy(os.path.join(FIXTURE_DATA, name), tmp_path / name)
    out[name] = str(tmp_path / name)
  return out


# ----------------------------------------------------- 1. real configs require paths

# The real configs (a checkpoint trained on record files) and their domains.
REAL_CONFIGS = {"hf_copd": ("math", "science"), "hf_vl_copd": ("math", "chart", "clip"),
                "pod_4b": ("text", "image", "video"), "pod_4b_v5e": ("text", "image", "video")}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_a_real_config_without_its_paths_fails_naming_the_field(name):
  cfg = cli.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))
  with pytest.raises(ValueError, match=r"config\.init\.hf_checkpoint is required: .*"
                                       r"--config\.init\.hf_checkpoint="):
    config_lib.build(cfg)
  cfg.init.hf_checkpoint = "/data/checkpoint"  # given: the next unset field is named
  first = sorted(REAL_CONFIGS[name])[0]
  with pytest.raises(ValueError, match=rf"config\.data\.train_files\.{first} is required"):
    config_lib.build(cfg)
  for domain in REAL_CONFIGS[name]:
    cfg.data.train_files[domain] = cfg.data.eval_files[domain] = "/data/records.jsonl"
  cfg.data.eval_files[first] = None  # one left: still named
  with pytest.raises(ValueError, match=rf"config\.data\.eval_files\.{first} is required"):
    config_lib.build(cfg)


def test_the_cli_names_the_unset_checkpoint_and_starts_nothing(tmp_path):
  result = main_cli(f"--config={REPO}/configs/hf_copd.py:micro", "--dry_run", cwd=tmp_path)
  assert result.returncode == 1
  assert "error: config.init.hf_checkpoint is required" in result.stderr
  assert os.listdir(tmp_path) == []
  shown = main_cli(f"--config={REPO}/configs/hf_copd.py:micro", "--help", cwd=tmp_path)
  assert shown.returncode == 0, shown.stderr[-2000:]
  required = {l.split(" = ")[0].strip() for l in shown.stdout.splitlines() if " = <required>" in l}
  assert required == {"init.hf_checkpoint", "data.train_files.math", "data.eval_files.math",
                      "data.train_files.science", "data.eval_files.science"}


def test_a_real_checkpoint_on_the_users_files_validates(tmp_path):
  cfg = cli.load_config_file(os.path.join(REPO, "configs", "hf_copd.py:micro"))
  cfg.init.hf_checkpoint = real_checkpoint(tmp_path, with_tokenizer=True)
  files = user_data(tmp_path)
  for domain, train, held_out in (("math", "math_train.jsonl", "math_eval.jsonl"),
                                  ("science", "science_train.parquet", "science_eval.parquet")):
    cfg.data.train_files[domain], cfg.data.eval_files[domain] = files[train], files[held_out]
  spec = config_lib.build(cfg)  # the tokenizer from the checkpoint directory (hf_tokenizer='')
  assert spec.init.hf_checkpoint == cfg.init.hf_checkpoint and spec.init.hf_tokenizer == ""
  assert spec.data.eval_files == {"math": files["math_eval.jsonl"],
                                  "science": files["science_eval.parquet"]}


# --------------------------------------------------------------- 2. RL sampling


@pytest.mark.parametrize("field, value", [
    ("sampling.temperature", 0.7), ("sampling.top_k", 5), ("sampling.top_p", 0.9)])
def test_rl_methods_reject_sampling_other_than_the_scored_distribution(field, value):
  for method in ("experts", "copd", "mopd"):
    cfg = default_config.get(method, "micro")
    default_config.set_field(cfg, field, value)
    with pytest.raises(ValueError, match=rf"config\.{re.escape(field)} must be .* for RL methods"):
      config_lib.validate_config(cfg)
  base = default_config.get("base", "micro")  # greedy evaluation only: allowed
  default_config.set_field(base, field, value)
  config_lib.validate_config(base)


# ----------------------------------------------------------------- 3. run names


def resolve(spec, **overrides):
  """What `python -m copd_jax.main --config=<spec> --config.<k>=<v> ...` resolves to."""
  cfg = cli.load_config_file(os.path.join(REPO, spec))
  for field, value in overrides.items():
    cli.set_field(cfg, field, value)
  return cli.resolve(cfg, os.path.join(REPO, spec), set(overrides))


def test_run_names_are_deterministic_and_follow_the_training_config():
  plain = resolve("configs/copd.py:micro")
  assert re.fullmatch(r"runs/copd_micro-[0-9a-f]{8}", plain.workdir)
  assert resolve("configs/copd.py:micro").workdir == plain.workdir  # same command, same run
  lr = resolve("configs/copd.py:micro", **{"rl.learning_rate": 1e-3})
  assert re.fullmatch(r"runs/copd_micro-rl\.learning_rate=0\.001-[0-9a-f]{8}", lr.workdir)
  assert lr.workdir[-8:] != plain.workdir[-8:]  # another training config, another hash
  # An override equal to the preset is no change; operational fields never rename a run.
  same = resolve("configs/copd.py:micro", **{"rl.steps": plain.rl.steps,
                                             "checkpoint.every_steps": 5, "rl.log_every": 3})
  assert same.workdir == plain.workdir
  # An explicit workdir is kept as given.
  assert resolve("configs/copd.py:micro", workdir="/tmp/mine").workdir == "/tmp/mine"


def test_config_hash_covers_training_fields_only():
  a = default_config.get("copd", "micro")
  b = default_config.get("copd", "micro")
  b.checkpoint.every_steps, b.mesh.data, b.eval.batch_size = 3, 2, 2
  assert run_dir.config_hash(cli.as_json(a)) == run_dir.config_hash(cli.as_json(b))
  b.rl.opd.beta = 0.25
  assert run_dir.config_hash(cli.as_json(a)) != run_dir.config_hash(cli.as_json(b))


# ------------------------------------------------------------------- 4. the CLI


def main_cli(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "copd_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=1800)


def test_help_lists_the_config_fields_with_defaults_and_meanings(tmp_path):
  result = main_cli(f"--config={REPO}/configs/copd.py:micro", "--help", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  beta = [l for l in lines if l.strip().startswith("rl.opd.beta = 1.0")]
  assert beta and "OPD rate of every branch" in beta[0]
  assert any(l.strip().startswith("rl.learning_rate = ") for l in lines)
  assert "--[no]dry_run" in result.stdout and "--[no]traceback" in result.stdout


def test_every_shipped_config_field_has_a_meaning():
  """--help's meanings are the RunSpec dataclasses' field docs: every field of every
  shipped config has one."""
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                 if f.endswith(".py") and f != "common.py")  # common.py: the shared recipe
  for name in names:
    cfg = cli.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))
    flat = run_dir.flatten(cli.as_json(cfg))
    missing = [k for k in flat if not run_spec.field_doc(k)]
    assert missing == [], f"configs/{name}.py fields without a doc in copd_jax/run_spec.py: {missing}"


def _library_fields(cls, dotted: str) -> bool:
  """Whether `dotted` ('vision.width') names a field of dataclass cls, or inside one."""
  for part in dotted.split("."):
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    if part not in fields:
      return False
    hint = typing.get_type_hints(cls).get(part)
    cls = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
  return True


def stale_subfield_docs() -> list[str]:
  """`fields=` docs of the library-type sections naming no field of the library class."""
  from copd_jax import losses, kernels
  from copd_jax.models import lora, model_config
  from copd_jax.rl import schedules
  library = {"model": model_config.ModelConfig, "model.lora": lora.LoraSpec,
             "rl.loss": losses.PolicyLossConfig, "rl.kernel": kernels.KernelConfig,
             "rl.opd.schedule": schedules.OPDSchedule}
  docs = run_spec.field_docs()
  out = []
  for key in set(docs) - set(library):  # a section itself (model.lora) is RunSpec's own
    owner = max((p for p in library if key.startswith(p + ".")), key=len, default=None)
    if owner and not _library_fields(library[owner], key[len(owner) + 1:]):
      out.append(key)
  return out


def test_every_run_spec_field_has_a_doc_and_no_doc_is_stale():
  docs = run_spec.field_docs()
  assert [k for k, meaning in docs.items() if not meaning] == []
  assert {"rl.opd.beta", "model.vision.width", "model.lora.rank", "rl.loss.eps_low"} <= set(docs)
  assert stale_subfield_docs() == []


def test_a_field_without_a_doc_or_a_stale_doc_is_found():
  from copd_jax import spec_fields

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Planted:
    documented: int = spec_fields.doc("has a meaning", 1)
    undocumented: int = 2  # declared without spec_fields.doc
  assert run_spec.field_docs(Planted, "x.") == {"x.documented": "has a meaning",
                                                "x.undocumented": ""}
  from copd_jax.models import model_config
  assert _library_fields(model_config.ModelConfig, "vision.width")
  assert not _library_fields(model_config.ModelConfig, "vision.wdith")
  with pytest.raises(ValueError, match="needs a one-line meaning"):
    spec_fields.doc("  ")


def test_help_lines_read_the_dataclass_docs():
  [beta] = [f for f in dataclasses.fields(run_spec.OPDSpec) if f.name == "beta"]
  [line] = cli.describe_fields({"rl.opd.beta": 1.0})
  assert line.split("  ")[-1].strip() == beta.metadata["doc"] == "OPD rate of every branch"
  # A dict field's entries read their field's doc; a library section's fields its fields= doc.
  assert run_spec.field_doc("tasks.difficulty.text") == run_spec.field_docs()["tasks.difficulty"]
  assert run_spec.field_doc("model.vision.width") == "ViT width"
  assert run_spec.field_doc("no_such.field") == ""


def test_dry_run_validates_prints_the_resolved_config_and_writes_nothing(tmp_path):
  result = main_cli(f"--config={REPO}/configs/copd.py:micro", "--config.rl.capabilities=text,image",
                    "--dry_run", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
  assert printed["rl"]["capabilities"] == ["text", "image"]
  assert printed["num_experts"] == 2 and printed["rl"]["opd"]["hub"] == "text"
  assert re.fullmatch(r"runs/copd_micro-rl\.capabilities=text\+image-[0-9a-f]{8}", printed["workdir"])
  assert os.listdir(tmp_path) == []  # nothing written, not even the run directory


def test_a_bad_value_prints_one_line_naming_the_field(tmp_path):
  result = main_cli(f"--config={REPO}/configs/copd.py:micro", "--config.rl.learning_rate=-1",
                    cwd=tmp_path)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: config.rl.learning_rate must be positive")
  unknown = main_cli(f"--config={REPO}/configs/copd.py:micro", "--config.rl.stepz=1", cwd=tmp_path)
  assert unknown.returncode == 1
  lines = unknown.stderr.strip().splitlines()
  assert len(lines) == 1 and "unknown config field 'stepz'" in lines[0] and "Traceback" not in unknown.stderr
  traced = main_cli(f"--config={REPO}/configs/copd.py:micro", "--config.rl.learning_rate=-1",
                    "--traceback", cwd=tmp_path)
  assert traced.returncode != 0 and "Traceback (most recent call last)" in traced.stderr


@pytest.mark.parametrize("method, caps, extra, experts, hub", [
    ("copd", "image,video", {}, 2, "image"),           # the hub follows: text is gone
    ("copd", "text,video", {}, 2, "text"),             # the preset's hub is kept
    ("copd", "image,video", {"rl.opd.hub": "video"}, 2, "video"),  # an override wins
    ("mixed_rlvr", "text,image", {}, 1, "text"),       # one branch whatever the list
])
def test_capability_list_derives_num_experts_and_hub(method, caps, extra, experts, hub):
  cfg = resolve(f"configs/{method}.py:micro", **{"rl.capabilities": (caps,)}, **extra)
  assert tuple(cfg.rl.capabilities) == tuple(caps.split(","))
  assert cfg.num_experts == experts and cfg.rl.opd.hub == hub
  config_lib.validate_config(cfg)


def test_static_opd_pair_follows_the_capabilities():
  cfg = resolve("configs/static_opd.py:micro", **{"rl.capabilities": ("image,video",)})
  assert (cfg.rl.static_opd.teacher, cfg.rl.static_opd.student) == ("image", "video")
  config_lib.validate_config(cfg)


def test_export_hf_shares_the_cli_conventions(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  run = lambda *a: subprocess.run([sys.executable, "-m", "copd_jax.export", *a], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=1800)
  assert run("--help").returncode == 0
  missing = run("--out=x", f"--workdir={tmp_path / 'nowhere'}")
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'nowhere' / 'config.json'} not found: is {tmp_path / 'nowhere'} a "
      "copd_jax.main workdir?  (--traceback for details)"]
