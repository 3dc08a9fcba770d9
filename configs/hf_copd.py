"""CoPD from a local Hugging Face Qwen3 checkpoint on record datasets (JSONL / Parquet).

The branches start from the checkpoint's weights (no SFT warm-start), read prompts from
`data.train_files` (one entry per domain), are scored by each record's verifier (math /
choice / exact / integer, copd_jax/data/verifiers.py), and are evaluated on `data.eval_files`.
The checkpoint and every domain's train and eval files are required: left unset, the run
stops at once with an error naming the field (the tests point them at the committed tiny
fixtures, tests/fixture_configs.py). A real run, from the repository root:

    python -m copd_jax.main --config=configs/hf_copd.py \
      --config.init.hf_checkpoint=/path/Qwen3-4B \
      --config.init.hf_tokenizer=/path/Qwen3-4B \
      --config.data.train_files.math=/data/polaris.jsonl \
      --config.data.eval_files.math=/data/aime24.jsonl \
      --config.data.train_files.science=/data/sciq_train.parquet \
      --config.data.eval_files.science=/data/sciq_test.parquet \
      --config.data.max_prompt_len=1024 --config.data.max_response_len=4096 \
      --config.sampling.max_new_tokens=4096 --config.model.dtype=bfloat16 \
      --config.workdir=runs/qwen3_copd

The config argument picks the domains (one CoPD branch each; the first is the hub) and,
with `micro`, a tiny preset that runs in seconds: `configs/hf_copd.py:math,science,micro`.
The default is `math,science`. Every domain's files must be set on the command line
(`--config.data.train_files.<domain>=...`). A file entry may be one path, comma-separated
paths or a glob (`/data/shards/*.parquet`). The tokenizer defaults to the checkpoint's own
(`config.init.hf_tokenizer=''`).

Only config.model.dtype (the compute dtype), remat, attention_block and attention_kernel
are read from config.model; the rest of the model comes from the checkpoint's config.json,
and overriding such a field (e.g. --config.model.d_model) is an error naming the
checkpoint's value. Prompts are chat-rendered by the
tokenizer's template and must fit data.max_prompt_len (a longer record is an error that
names its file and line).
"""
from copd_jax import default_config


def _parse_arg(arg: str) -> tuple[tuple[str, ...], str]:
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  preset = "micro" if "micro" in parts else "toy"
  domains = tuple(p for p in parts if p not in ("micro", "toy")) or ("math", "science")
  return domains, preset


def get_config(arg: str = ""):
  domains, preset = _parse_arg(arg)
  return default_config.checkpoint_config(
      domains, preset, workdir="runs/hf_copd", max_prompt_len=64, max_response_len=32)
