"""CoPD from a local Hugging Face Qwen3-VL checkpoint: text / image / video domains, one
branch each, the text domain as the hub (the paper's setting).

Records (JSONL / Parquet, copd_jax/data/records.py) carry their pictures: `images` (any
number, any sizes) or `video_frames` with `video_fps`. Prompts are built with the
checkpoint's own chat template and its preprocessor_config.json /
video_preprocessor_config.json, and each prompt's media are padded to
`data.vision_budget` patches (0 = the most any record needs), so a step compiles once
for any mix of image sizes, videos and text. The checkpoint and every domain's train and
eval files are required: left unset, the run stops at once with an error naming the field
(the tests point them at the committed tiny fixtures, tests/fixture_configs.py).
A real run, from the repository root:

    python -m copd_jax.main --config=configs/hf_vl_copd.py \
      --config.init.hf_checkpoint=/path/Qwen3-VL-4B-Instruct \
      --config.data.train_files.math=/data/math_train.jsonl \
      --config.data.eval_files.math=/data/math_eval.jsonl \
      --config.data.train_files.chart=/data/chart_train.parquet \
      --config.data.eval_files.chart=/data/chart_eval.parquet \
      --config.data.train_files.clip=/data/video_train.jsonl \
      --config.data.eval_files.clip=/data/video_eval.jsonl \
      --config.data.max_prompt_len=2048 --config.data.vision_budget=16384 \
      --config.data.max_response_len=4096 --config.sampling.max_new_tokens=4096 \
      --config.model.dtype=bfloat16 --config.workdir=runs/qwen3_vl_copd

The config argument names the domains, text first (it is the hub), with `micro` for a
preset that runs in a few minutes on a CPU: `configs/hf_vl_copd.py:math,chart,clip,micro`.
The default is `math,chart,clip`. Every domain's files must be set on the command line. Only config.model.dtype and the execution settings
(remat, attention) are read from config.model; the rest comes from the checkpoint.
"""
from copd_jax import default_config


def _parse_arg(arg: str) -> tuple[tuple[str, ...], str]:
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  preset = "micro" if "micro" in parts else "toy"
  domains = tuple(p for p in parts if p not in ("micro", "toy")) or ("math", "chart", "clip")
  return domains, preset


def get_config(arg: str = ""):
  domains, preset = _parse_arg(arg)
  c = default_config.checkpoint_config(
      domains, preset, workdir="runs/hf_vl_copd", max_prompt_len=96, max_response_len=16)
  c.data.vision_budget = 0  # the most any record needs
  return c
