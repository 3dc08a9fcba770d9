"""One-line meanings of the config fields, for `--help` (copd_jax/cli.py).

Keys are dotted field names or section prefixes: a field's meaning is that of the longest
key it starts with, so `tasks.difficulty.text` reads the `tasks.difficulty` line.
"""
from __future__ import annotations

from typing import Any, Mapping

FIELD_HELP = {
    "method": "what runs: base | experts | mixed_rlvr | static_opd | mopd | copd",
    "seed": "RL seed (prompt order, sampling keys); the base has warm_start.seed",
    "workdir": "run directory; unset = runs/<method>[-<overrides>]-<config hash>",
    "num_experts": "branches trained at once; derived from rl.capabilities when unset",
    "model": "toy Qwen3-layout decoder; with init.hf_checkpoint only dtype, remat, "
             "attention_block and attention_kernel are read",
    "model.vocab_size": "vocabulary size (>= the toy tokenizer's)",
    "model.d_model": "hidden width",
    "model.num_layers": "decoder layers",
    "model.num_heads": "query heads",
    "model.num_kv_heads": "key/value heads (grouped-query attention); divides num_heads",
    "model.head_dim": "width of one attention head (even: rotary pairs)",
    "model.mlp_dim": "SwiGLU hidden width",
    "model.rope_theta": "rotary embedding base",
    "model.rms_norm_eps": "RMSNorm epsilon",
    "model.tie_embeddings": "LM head shares the token embedding",
    "model.dtype": "compute dtype (float32 | bfloat16); parameters stay float32",
    "model.remat": "rematerialise each decoder layer in the backward pass (saves memory)",
    "model.scan_layers": "run the decoder layers under one nn.scan: parameters stacked "
                         "[layers, ...] (layers/... instead of layers_{i}/...), compile time "
                         "independent of depth; HF import stacks, export unstacks",
    "model.attention_block": "queries per attention block; 0 = all at once. With a block no "
                             "[T, T] score matrix is built (memory-efficient attention for "
                             "long sequences), same values",
    "model.attention_kernel": "xla | splash (Pallas splash attention; TPU, interpret mode "
                              "elsewhere) | auto (splash on TPU, xla elsewhere); same values",
    "model.lora": "LoRA branches: every branch a low-rank adapter on one shared frozen base",
    "model.lora.rank": "adapter rank r; 0 = full fine-tuning (every branch a full copy)",
    "model.lora.alpha": "adapter scale alpha / r (the PEFT convention)",
    "model.lora.targets": "projections adapted: q_proj k_proj v_proj o_proj gate_proj up_proj "
                          "down_proj (embeddings and the LM head are not)",
    "model.image_token_id": "token id of the <img> placeholder vision embeddings replace",
    "model.vision": "toy tubelet-ViT vision encoder",
    "model.vision.image_size": "input image side in pixels (a multiple of patch_size)",
    "model.vision.patch_size": "patch side in pixels",
    "model.vision.channels": "colour channels",
    "model.vision.num_frames": "video frames per clip (a multiple of tubelet)",
    "model.vision.tubelet": "frames per tubelet patch",
    "model.vision.width": "ViT width",
    "model.vision.depth": "ViT layers",
    "model.vision.num_heads": "ViT attention heads",
    "model.vision.mlp_dim": "ViT MLP width",
    "tasks.capabilities": "capabilities (or record domains) the base sees",
    "tasks.difficulty": "difficulty knob of each procedural generator",
    "tasks.seed": "task-suite seed: train stream and held-out set derive from it",
    "data.max_prompt_len": "prompt tokens per row (vision placeholders included)",
    "data.max_response_len": "response tokens per row",
    "data.train_files": "record files per capability (JSONL / Parquet / saved HF dataset)",
    "data.eval_files": "held-out record files per capability",
    "data.shuffle_seed": "shuffle seed of record datasets",
    "data.vision_budget": "Qwen3-VL patches per prompt (media padded to it); 0 = the most any record needs",
    "data.reader": "builtin (errors name the line) | datasets (HF datasets, offline)",
    "data.columns": "record field -> column name, e.g. {'prompt': 'question'} (every file; "
                    "data.sources has columns per source)",
    "data.sources": "per-source records {name: {path|dataset, split, domain, columns, "
                    "weight}}; a domain's train sources mixed by weight (copd_jax/data/sources.py)",
    "data.system_prompt": "system message before every chat-rendered prompt ('' = none)",
    "data.chat_template_kwargs": "chat-template arguments, e.g. {'enable_thinking': False} (Qwen3)",
    "eval.pass_threshold": "pass@k: a sample passes when its reward is >= this (1.0 = fully "
                           "correct; partial credit below it is no pass)",
    "data.conflict": "divergence dial in [0, 1]: share of total/remain prompts in their shared, "
                     "cue-only surface form (toy_tasks); 0 = none",
    "init.hf_checkpoint": "local Hugging Face Qwen3 or Qwen3-VL checkpoint directory; '' = toy base",
    "init.hf_tokenizer": "tokenizer directory; '' = the checkpoint's own",
    "mesh": "device mesh sizes (one may be -1 = the devices left over)",
    "mesh.expert": "mesh axis over branches (divides num_experts)",
    "mesh.data": "mesh axis over the batch",
    "mesh.fsdp": "mesh axis for fully sharded parameters",
    "mesh.tensor": "mesh axis for tensor parallelism",
    "pod": "the pod slice a pod config is sized for (lowering only)",
    "checkpoint.every_steps": "save training state every K steps (0 = stage ends + SIGTERM)",
    "checkpoint.max_to_keep": "checkpoints kept per stage",
    "checkpoint.async_save": "save in the background",
    "checkpoint.resume": "resume from the newest checkpoint in workdir",
    "checkpoint.save_on_sigterm": "SIGTERM saves at the next step boundary and exits 0",
    "checkpoint.resume_changed_config": "resume a workdir whose training config differs, on purpose",
    "warm_start.seed": "the base's own seed (init and SFT data)",
    "warm_start.steps": "SFT steps of the toy base",
    "warm_start.batch_size": "SFT examples per step",
    "warm_start.learning_rate": "SFT peak learning rate (warmup + cosine decay)",
    "warm_start.warmup_steps": "SFT warmup steps",
    "warm_start.weight_decay": "SFT AdamW weight decay",
    "warm_start.grad_clip_norm": "SFT global gradient-norm clip",
    "warm_start.mix": "SFT sampling weight of each capability",
    "checkpoint.sigterm_grace_s": ("after SIGTERM, seconds to reach a step boundary and save "
                                   "before the process exits without saving"),
    "checkpoint.fallback_on_corrupt": ("a newest checkpoint failing its checksums: False = "
                                       "error, True = restore the newest good one"),
    "checkpoint.allow_unverified": ("a checkpoint without checksums (arrays, host state, "
                                    "config): False = error, True = resume it unverified"),
    "reward": "how responses are scored (sandboxed verifier worker processes)",
    "reward.fn": "'module:function' plug-in fn(response, example) -> float; '' = each "
                 "example's own verifier",
    "reward.timeout_s": "per-answer time limit in seconds (over it: reward 0)",
    "reward.step_budget_s": "time budget in seconds for one step's (or eval batch's) answers",
    "reward.workers": "verifier worker processes (at most the CPUs this process may use)",
    "reward.worker_memory_mb": ("each verifier worker's memory limit in MiB (over it: that "
                                "answer scores 0, the worker is replaced and counted)"),
    "reward.max_error_fraction": ("fraction of a batch's responses whose plug-in fails "
                                  "(raises, NaN, inf, non-number) at which the run stops; "
                                  "1.0 = all of them, 0.0 = any"),
    "reward.fns": "several rewards: comma-separated 'verifier' (built-in) / 'module:function' "
                  "entries, summed with reward.weights; '' = reward.fn alone",
    "reward.weights": "one weight per reward.fns entry, e.g. (1.0, 0.2); () = all 1.0",
    "rl.max_nonfinite_steps_total": "skipped (non-finite) updates in one stage, all "
                                    "branches together, before the run stops",
    "warm_start.flaw_rate": ("fraction of each capability's SFT demonstrations showing its "
                             "flawed procedure (toy_flaws.FLAW_KINDS), for RL to correct"),
    "warm_start.checkpoint_dir": "where the base is saved / reused ('' = <workdir>/base_policy)",
    "warm_start.reuse_checkpoint": "load a saved base with the same recipe instead of training",
    "warm_start.log_every": "SFT steps between log lines",
    "eval.num_examples": "held-out examples per capability in the final evaluation",
    "eval.batch_size": "prompts per evaluation sampler call",
    "eval.pass_samples": "samples per prompt for pass@k (0 = greedy accuracy only)",
    "eval.pass_k": "the k of pass@k (each <= pass_samples)",
    "eval.pass_temperature": "sampling temperature of the pass@k samples",
    "log.completions": "prompts per capability/branch logged with their responses (0 = off)",
    "log.completions_every": "RL steps between logged training completions (0 = evals only)",
    "log.wandb": "mirror the logs to Weights & Biases (needs the wandb extra)",
    "log.wandb_project": "wandb project name",
    "log.wandb_mode": "wandb mode: offline (no network) | online | disabled",
    "sampling.temperature": "rollout temperature (RL methods: must be 1)",
    "sampling.top_k": "rollout top-k (RL methods: must be 0 = full vocabulary)",
    "sampling.top_p": "rollout nucleus mass (RL methods: must be 1)",
    "sampling.max_new_tokens": "response tokens sampled at most",
    "rl.capabilities": "capabilities trained, one branch each (text,image sets num_experts=2)",
    "rl.steps": "optimizer steps of ONE expert (mixed RLVR: x capabilities)",
    "rl.native_prompts": "GRPO prompts per branch per step",
    "rl.samples_per_prompt": "G: rollouts per prompt",
    "rl.cross_prompts": "prompts per branch per OPD step from its teachers' data",
    "rl.learning_rate": "RL (peak) learning rate",
    "rl.lr_schedule": "'constant' or 'cosine' (decay over each stage's steps)",
    "rl.lr_end_fraction": "cosine schedule: final learning rate / rl.learning_rate",
    "rl.grad_clip_norm": "RL global gradient-norm clip per branch",
    "rl.weight_decay": "RL AdamW weight decay",
    "rl.scale_by_std": "GRPO advantages divided by the group std (False = Dr.GRPO)",
    "rl.loss": "policy loss (copd_jax/losses.py PolicyLossConfig)",
    "rl.loss.eps_low": "PPO clip below 1",
    "rl.loss.eps_high": "PPO clip above 1 (asymmetric clip-higher)",
    "rl.loss.kl_coef": "KL penalty to the base (0 = none)",
    "rl.loss.kl_estimator": "KL estimator: k1 | k2 | k3",
    "rl.loss.entropy_coef": "entropy bonus",
    "rl.loss.aggregation": "token_mean | seq_mean_token_mean | seq_sum_constant",
    "rl.loss.opd_student_logprob": "student log-prob in the OPD ratio: old | current",
    "rl.loss.tis_cap": "truncated importance sampling: PG weight min(pi_trainer/pi_sampler, "
                       "cap); 0 = off",
    "rl.kernel": "fused LM-head loss implementation",
    "rl.kernel.backend": "reference | chunked | pallas",
    "rl.kernel.vocab_tile": "vocabulary tile of the fused loss",
    "rl.kernel.token_tile": "token tile of the fused loss",
    "rl.opd.topology": "who teaches whom: hub | full | ring | none",
    "rl.opd.hub": "the hub branch of the hub topology (derived from rl.capabilities)",
    "rl.opd.beta": "OPD rate of every branch",
    "rl.opd.branch_beta": "per-capability OPD rates, e.g. {'text': 0.5}",
    "rl.opd.estimator": "OPD signal: sampled_token (the paper's) | top_k (reverse KL on the "
                        "teacher's top k) | full_vocab (exact; one device, small vocab)",
    "rl.opd.top_k": "k of the top_k estimator: tokens (ids + log-probs) a teacher sends",
    "rl.opd.schedule.kind": "OPD schedule: cycle | constant | adaptive | none",
    "rl.opd.schedule.s_rl": "cycle: RL-only steps per cycle",
    "rl.opd.schedule.s_opd": "cycle: RL+OPD steps per cycle (adaptive: phase length)",
    "rl.opd.schedule.constant_weight": "constant: OPD weight on every step",
    "rl.opd.schedule.overlap_target": "adaptive: start OPD when top-10 overlap falls below",
    "rl.opd.schedule.warmup_steps": "RL-only steps before any OPD",
    "rl.merge_weights": "per-branch merge weights ({} = uniform average)",
    "rl.distill_steps": "steps of the static OPD / MOPD distillation stage",
    "rl.experts_dir": "a finished experts run to reuse as stage 1 ('' = train them)",
    "rl.static_opd.teacher": "static OPD: the frozen teacher expert",
    "rl.static_opd.student": "static OPD: the student expert",
    "rl.mopd.cross_outcome_reward": "MOPD: add the outcome reward to distillation rows",
    "rl.eval_every": "RL steps between held-out evaluations",
    "rl.eval_examples": "held-out examples per capability during training",
    "rl.diagnostics_every": "RL steps between overlap / symmetric-KL diagnostics",
    "rl.diagnostic_prompts": "prompts per branch for the diagnostics",
    "rl.log_every": "RL steps between progress lines",
    "rl.max_nonfinite_steps_in_row": "non-finite steps in a row that stop the run",
    "rl.micro_batch_rows": "rows per gradient-accumulation micro-batch (0 = all at once)",
}


# What config.model still sets when config.init.hf_checkpoint is the model: how to
# compute (dtype, remat, attention), never the architecture.
CHECKPOINT_READ_MODEL_FIELDS = ("dtype", "remat", "attention_block", "attention_kernel", "lora")


def checkpoint_fixes(field: str) -> bool:
  """True for a config.model field that a Hugging Face checkpoint's config.json decides."""
  parts = field.split(".")
  return parts[0] == "model" and len(parts) > 1 and parts[1] not in CHECKPOINT_READ_MODEL_FIELDS


# With config.init.hf_checkpoint the checkpoint is the base: no SFT warm-start, and the
# procedural suite's difficulty knob is unused (the data are record files).
UNUSED_WITH_CHECKPOINT = ("warm_start", "tasks.difficulty")


def applies(field: str, cfg) -> bool:
  """Whether a dotted field does anything in this config: with a Hugging Face checkpoint,
  the model fields its config.json fixes (cli.checkpoint_fixes), the SFT warm-start and
  the procedural tasks' difficulty do not."""
  if "init" not in cfg or not cfg.init.get("hf_checkpoint", ""):
    return True
  if checkpoint_fixes(field):
    return False
  return not any(field == p or field.startswith(p + ".") for p in UNUSED_WITH_CHECKPOINT)


def applicable_fields(flat: Mapping[str, Any], cfg) -> dict[str, Any]:
  """The entries of a flattened config (run_dir.flatten) that apply (see `applies`)."""
  return {k: v for k, v in flat.items() if applies(k, cfg)}


def field_help(field: str) -> str:
  """The meaning of a dotted field: its own line or its longest documented prefix's."""
  parts = field.split(".")
  for n in range(len(parts), 0, -1):
    key = ".".join(parts[:n])
    if key in FIELD_HELP:
      return FIELD_HELP[key]
  return ""


def describe_fields(flat: Mapping[str, Any]) -> list[str]:
  """'  field = default    meaning' lines for a flattened config (run_dir.flatten)."""
  width = max((len(f"{k} = {v!r}") for k, v in flat.items()), default=0)
  width = min(width, 44)
  return [f"  {f'{k} = {v!r}':<{width}}  {field_help(k)}".rstrip() for k, v in flat.items()]
