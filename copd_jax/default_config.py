"""The shared skeleton of every run config; the recipes are in configs/*.py.

`skeleton()` holds every section a run has, with the values no recipe is about (the toy
testbed's model and data sizes, checkpoints, rewards, evaluation, logging), and
`rl_skeleton()` the RL trainer's section (its cadence, limits and kernel, and the
structural defaults of the OPD sections). Each file in configs/ states its recipe on top
(configs/common.py: the toy base and the GRPO recipe every RL method shares; a method's
own file: what makes it that method), then `apply_preset` shrinks it to a preset.
`get(method, preset)` loads configs/<method>.py.
"""
import os

import ml_collections
from ml_collections import config_dict

from copd_jax.run_spec import METHODS  # noqa: F401 (the methods a config may name)

PRESETS = ("toy", "micro", "demo")
# The toy base policy the committed results start from (docs/toy_testbed.md).
COMMITTED_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "experiments", "results", "base_policy")


def toy_model() -> ml_collections.ConfigDict:
  """A Qwen3-layout decoder small enough to train on 2 CPU cores."""
  return ml_collections.ConfigDict(dict(
      vocab_size=64,
      d_model=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      mlp_dim=384,
      rope_theta=10_000.0,
      rms_norm_eps=1e-6,
      tie_embeddings=True,
      dtype="bfloat16",  # compute dtype; parameters are always float32
      remat=False,  # rematerialise each decoder layer in the backward pass (saves memory)
      scan_layers=False,  # decoder layers under one nn.scan (stacked params; fast compiles)
      attention_block=0,  # queries per attention block (0 = all at once; long sequences)
      attention_kernel="xla",  # xla | splash (Pallas, TPU) | auto (splash on TPU)
      image_token_id=3,  # ToyTokenizer's <img> placeholder
      vision=dict(image_size=32, patch_size=8, channels=3, num_frames=4,
                  tubelet=2, width=64, depth=2, num_heads=4, mlp_dim=128),
  ))


def skeleton() -> ml_collections.ConfigDict:
  """Every section of a run config but `rl` (rl_skeleton), at the toy testbed's sizes; a
  recipe (configs/*.py) states tasks, warm_start and rl on top."""
  c = ml_collections.ConfigDict()
  c.method = "base"
  c.seed = 0
  c.workdir = "runs/base"
  c.num_experts = 1

  c.model = toy_model()
  # LoRA branches (copd_jax/models/lora.py). rank 0 = full fine-tuning: every branch is a
  # full copy of the base. rank r > 0: every branch is a rank-r adapter (scale alpha / r)
  # on the target projections of ONE shared, frozen base (no gradient, no optimizer
  # state); merging averages the branches' effective weights W + scale B_k A_k.
  c.model.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0,
      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))

  c.data = ml_collections.ConfigDict(dict(
      max_prompt_len=64, max_response_len=24,
      # Record files (JSONL or Parquet, copd_jax/data/records.py) per capability; empty =
      # the built-in procedural task suite (copd_jax/data/toy_tasks.py).
      train_files={}, eval_files={},
      shuffle_seed=0,  # grain shuffle of record datasets (procedural streams need none)
      # Qwen3-VL: image / video patches per prompt, every prompt padded to it so one
      # program serves any mix of media sizes; 0 = the most any train or eval record needs.
      vision_budget=0,
      # How record files are read: "builtin" (JSONL lines / Parquet rows, errors name the
      # line) or "datasets" (the Hugging Face `datasets` library, offline). A directory
      # written by `Dataset.save_to_disk` is always read with `datasets.load_from_disk`.
      reader="builtin",
      # Record field -> column name in the files, e.g. {'prompt': 'question'}; unmapped
      # fields keep their own names (copd_jax/data/records.py).
      columns={},
      # Per-source data (copd_jax/data/sources.py), instead of train_files / eval_files /
      # columns: {name: {path | dataset, split: train | eval, domain, columns, weight}};
      # a domain's train sources are mixed by weight. --config.data.sources.<name>.weight=2
      sources={},
      # Chat-rendered prompts (a checkpoint's tokenizer): a system message before every
      # question ('' = none), and keyword arguments for the chat template, e.g.
      # {'enable_thinking': False} for Qwen3.
      system_prompt="",
      chat_template_kwargs={},
      # The divergence dial (copd_jax/data/toy_tasks.py, "Conflict"): the fraction of the
      # conflict families' (total, remain) RL and held-out prompts drawn in a surface
      # form the two share, told apart by a one-letter cue the base ignores. 0 = none;
      # other families ignore it; the base's demonstrations use a fixed mix.
      conflict=0.0,
  ))
  # Start from a local Hugging Face checkpoint directory (copd_jax/models/hf_checkpoint.py)
  # instead of the SFT warm-start; "" = the built-in toy base.
  c.init = ml_collections.ConfigDict(dict(
      hf_checkpoint="",
      hf_tokenizer="",  # tokenizer directory when not inside hf_checkpoint
  ))

  # Device mesh (copd_jax/sharding.py). Sizes of the named axes; one of them may be -1
  # (= the devices left over). Branches are sharded over `expert`; inside a branch FSDP
  # over `fsdp`, tensor parallelism over `tensor`, the batch over `data` x `fsdp`.
  # All 1 (the default) = a mesh of one device (the same programs); e.g. --config.mesh.data=-1
  # spreads the batch over every device, --config.mesh.expert=3 puts one branch per group.
  c.mesh = ml_collections.ConfigDict(dict(expert=1, data=1, fsdp=1, tensor=1))
  # Training-state checkpoints (orbax CheckpointManager) under <workdir>/checkpoints.
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=0,        # 0 = only at the end of a stage and on SIGTERM
      max_to_keep=2,
      async_save=True,
      resume=True,          # resume from the latest checkpoint in workdir if one exists
      save_on_sigterm=True,
      # A workdir belongs to one training config (copd_jax/run_dir.py): True resumes it
      # with changed training fields on purpose (never with another method).
      resume_changed_config=False,
      # After SIGTERM the run saves at the next step boundary; if it has not exited this
      # many seconds later (stuck in a write, a compile, ...), it exits without saving.
      sigterm_grace_s=120.0,
      # A newest checkpoint that fails its checksums is an error; True = restore the
      # newest one that passes instead.
      fallback_on_corrupt=False,
      # A checkpoint without checksums of its arrays, host state (stream positions, RNG)
      # and config is an error; True = resume it unverified (older checkpoints).
      allow_unverified=False,
  ))

  # Rewards (copd_jax/data/verifiers.py): answers are compared in sandboxed worker processes.
  c.reward = ml_collections.ConfigDict(dict(
      fn="",                # 'module:function' plug-in fn(response, example) -> float for
                            # every example; "" = the verifier each example names
      # Several weighted reward functions (copd_jax/data/reward_fns.py): comma-separated
      # 'verifier' (the built-in one) / 'module:function' entries, and one weight each
      # (() = all 1.0); "" = the single `fn` above.
      fns="",
      weights=(),
      timeout_s=5.0,        # per answer; an answer over it scores 0
      step_budget_s=300.0,  # per step (or eval batch); answers not scored by then score 0
      workers=2,            # verifier worker processes, at most the CPUs this process may use
      worker_memory_mb=2048,  # each worker's address-space limit; over it: reward 0, replaced
      max_error_fraction=1.0,  # plug-in failures (raised, NaN, inf, non-number) in a batch
                               # at which the run stops; 1.0 = all responses, 0.0 = any
  ))

  # Held-out evaluation: greedy accuracy, plus pass@k from `pass_samples` samples per
  # prompt at `pass_temperature` (0 samples = greedy accuracy only; every k <= samples).
  # 1,000 held-out items per capability: a standard error of about 1.5 points.
  # A sample passes when its reward is >= pass_threshold (1.0: fully correct; partial
  # credit below it is not a pass).
  c.eval = ml_collections.ConfigDict(dict(num_examples=1000, batch_size=250,
                                          pass_samples=0, pass_k=(1,), pass_temperature=1.0,
                                          pass_threshold=1.0))
  # What a run reports besides scalars (copd_jax/run_log.py): sample completions at
  # every evaluation and every `completions_every` RL steps (0 = only at evaluations),
  # as TensorBoard text and <workdir>/completions.jsonl; optional Weights & Biases.
  c.log = ml_collections.ConfigDict(dict(
      completions=2,          # prompts per capability (eval) / per branch (training); 0 = off
      completions_every=0,
      wandb=False,            # mirror TensorBoard to wandb (pip install -e ".[wandb]")
      wandb_project="copd-jax",
      wandb_mode="offline",   # offline | online | disabled
  ))
  c.sampling = ml_collections.ConfigDict(dict(
      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=24))

  return c


def rl_skeleton() -> ml_collections.ConfigDict:
  """The RL trainer's section (copd_jax/rl/methods.py) without the recipe: its cadence,
  limits and fused-loss kernel, and the structural defaults of the method-specific
  settings (OPD, the two-stage baselines), which the method that uses one restates in its
  own config. The GRPO recipe every method trains with is configs/common.py's."""
  return ml_collections.ConfigDict(dict(
      kernel=dict(backend="chunked", vocab_tile=64, token_tile=1024),
      cross_prompts=8,        # per branch, on OPD steps, from its teachers' data
      opd=dict(
          topology="hub",     # hub | full | ring (each branch <-> its 2 neighbours) | none
          hub="text",
          beta=1.0,           # OPD rate of every branch ...
          branch_beta={},     # ... or per capability, e.g. {'text': 0.5}: asymmetric rates
          schedule=dict(kind="cycle", s_rl=3, s_opd=2,
                        constant_weight=1.0, overlap_target=0.9, warmup_steps=0),
          # sampled_token (the paper's token advantage) | top_k (reverse KL renormalised
          # on the teacher's top_k tokens, which it sends instead of one log-prob) |
          # full_vocab (the exact reverse KL; one device, small vocabularies).
          estimator="sampled_token",
          top_k=16,
      ),
      merge_weights={},       # per capability branch; empty = uniform average
      # Two-stage baselines: stage 2 length in steps, and where stage-1 experts come from.
      distill_steps=60,
      experts_dir="",         # a finished `experts` run's workdir to reuse; "" = train them
      static_opd=dict(teacher="text", student="image"),
      mopd=dict(cross_outcome_reward=False),
      eval_every=10,
      eval_examples=100,       # per capability, during training (final eval: eval.num_examples)
      diagnostics_every=5,    # steps between overlap / symmetric-KL measurements (the
                              # adaptive schedule reacts to the latest one)
      diagnostic_prompts=8,   # per branch, for overlap / symmetric KL
      log_every=1,
      # A branch's update whose loss, gradients or new parameters are not finite is not
      # applied (the other branches' are) and counted; this many in a row for one
      # branch, or this many in total in a stage, stop the run with an error.
      max_nonfinite_steps_in_row=3,
      max_nonfinite_steps_total=10,
      # Rows per branch per gradient-accumulation micro-batch (0 = all rows at once).
      # Exact: the loss is accumulated as (sum, denominator). Teacher scoring is chunked too.
      micro_batch_rows=0,
  ))


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """c (a recipe, configs/*.py) at `preset`, in place; returned.

  toy: the recipe as stated. micro: a run of seconds for the tests (a 1-layer model, a
  few SFT and RL steps, tiny batches and evaluations). demo: demo_settings. Every preset
  names its run directory runs/<method>[_micro|_demo] and shares one saved base among
  the methods (warm_start.checkpoint_dir)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown config preset {preset!r}; use one of {', '.join(PRESETS)}")
  micro = preset == "micro"
  c.workdir = f"runs/{c.method}" + ("_micro" if micro else "")
  c.warm_start.checkpoint_dir = "runs/base_policy" + ("_micro" if micro else "")
  if micro:
    c.model.update(dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        head_dim=16, mlp_dim=64, dtype="float32"))
    c.model.vision.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32))
    c.warm_start.update(dict(steps=4, batch_size=6, warmup_steps=1, log_every=2))
    c.eval.update(dict(num_examples=6, batch_size=6))
    c.rl.update(dict(steps=2, native_prompts=2, samples_per_prompt=2, cross_prompts=2,
                     distill_steps=2, eval_every=2, eval_examples=4, diagnostic_prompts=2,
                     diagnostics_every=2))
    c.rl.opd.schedule.update(dict(s_rl=1, s_opd=1))
  if preset == "demo":
    demo_settings(c, c.method)
  return c


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")


def get(method: str, preset: str = "toy") -> ml_collections.ConfigDict:
  """The config of `method` at `preset` ('toy', 'micro' or 'demo'): configs/<method>.py's."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")
  from copd_jax import config_files
  return config_files.config_module(os.path.join(CONFIGS_DIR, f"{method}.py")).get_config(preset)


def demo_settings(c: ml_collections.ConfigDict, method: str) -> None:
  """The `demo` preset: a first run that visibly learns in about two minutes on a 2-core
  CPU. It starts from the committed toy base (COMMITTED_BASE, no warm-start to train), keeps
  two capabilities (text, whose sign slip RL corrects fastest, and image), a short run at
  the toy recipe's learning rate held constant, and small evaluations. Many prompts with
  few samples each (64 x 4) keep one step's mean reward steady enough to compare the
  first step with the last: summary.json's reward_first_step / reward_last_step."""
  c.workdir = f"runs/{method}_demo"
  c.warm_start.checkpoint_dir = COMMITTED_BASE
  if method not in ("base", "mixed_rlvr"):
    c.rl.capabilities = ("text", "image")
    c.num_experts = 2
  c.rl.opd.hub = "text"
  c.rl.static_opd.update(dict(teacher="text", student="image"))
  c.rl.update(dict(steps=20, native_prompts=64, samples_per_prompt=4, cross_prompts=8,
                   learning_rate=3e-4, lr_schedule="constant", eval_every=1000,
                   eval_examples=8, diagnostics_every=1000, diagnostic_prompts=2,
                   distill_steps=4))
  c.eval.update(dict(num_examples=32, batch_size=32))
  c.log.completions = 0


def required_path() -> config_dict.FieldReference:
  """A path a real run must be given (--config.<field>=...): None until set, so that
  config_lib.build fails naming the field (check_required_paths) instead of running on a
  default. Lowering-only tools (config_lib.spec_of) read it as unset (no checkpoint)."""
  return config_dict.placeholder(str)


def require_paths(c: ml_collections.ConfigDict, domains) -> None:
  """c's checkpoint and every domain's train / eval record files set to required_path()."""
  c.init.hf_checkpoint = required_path()
  c.data.train_files = {d: required_path() for d in domains}
  c.data.eval_files = {d: required_path() for d in domains}


def checkpoint_config(domains: tuple[str, ...], preset: str, *, workdir: str,
                      max_prompt_len: int, max_response_len: int) -> ml_collections.ConfigDict:
  """CoPD from a Hugging Face checkpoint on record files, one branch per domain, the
  first domain the hub (configs/hf_copd.py, configs/hf_vl_copd.py).

  The checkpoint and every domain's train / eval files are required (require_paths);
  the tokenizer defaults to the checkpoint's own ("" = its tokenizer files). preset
  'micro': a tiny run (2 held-out items, 8 new tokens, a learning rate that moves a
  random fixture)."""
  c = get("copd", preset)
  c.workdir = workdir + ("_micro" if preset == "micro" else "")
  c.init.hf_tokenizer = ""  # "" = the checkpoint directory's tokenizer files
  c.tasks.capabilities = domains
  c.tasks.difficulty = {}  # the procedural suite's knob; unused with record files
  require_paths(c, domains)
  c.data.max_prompt_len = max_prompt_len
  c.data.max_response_len = max_response_len
  c.sampling.max_new_tokens = max_response_len
  c.model.dtype = "float32"
  c.warm_start.mix = {}  # no SFT: the checkpoint is the base
  c.num_experts = len(domains)
  c.rl.capabilities = domains
  c.rl.opd.hub = domains[0]
  c.rl.static_opd.teacher, c.rl.static_opd.student = (domains + domains)[:2]
  c.rl.learning_rate = 1e-6  # the paper's, for a released model
  c.eval.num_examples = 128
  if preset == "micro":
    c.rl.learning_rate = 1e-4
    c.data.max_response_len = 8
    c.sampling.max_new_tokens = 8
    c.eval.update(dict(num_examples=2, batch_size=2))
  return c


def set_field(cfg: ml_collections.ConfigDict, dotted: str, value) -> None:
  """cfg['a']['b']['c'] = value for dotted = 'a.b.c' (what --config.a.b.c=value does)."""
  node = cfg
  *parents, leaf = dotted.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
