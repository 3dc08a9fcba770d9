"""The toy testbed's shared recipe (not a run config: configs/<method>.py build on it).

`toy_base` is the base every toy method starts from (configs/base.py trains it);
`grpo` is the GRPO recipe every RL method trains with, so that the methods differ only
in what their own config file states. The values no recipe is about (model and data
sizes, checkpoints, rewards, evaluation, logging) are copd_jax/default_config.py's
skeleton.
"""
import ml_collections

from copd_jax import default_config

CAPABILITIES = ("text", "image", "video")


def toy_base(c: ml_collections.ConfigDict) -> None:
  """The toy base: the procedural task suite and the SFT warm-start that trains it."""
  c.tasks = ml_collections.ConfigDict(dict(
      capabilities=CAPABILITIES,
      # The difficulty knob of each generator (copd_jax/data/toy_tasks.py). Level 1: the
      # small base model is competent enough that the procedure, not perception, decides.
      difficulty=dict(text=1, image=1, video=1),
      seed=1234,  # task-suite seed: train stream and held-out set derive from it
  ))
  # SFT warm-start: the analog of the paper's instruction-tuned base. `mix` sets how
  # much of each capability the base sees, i.e. where each capability starts.
  c.warm_start = ml_collections.ConfigDict(dict(
      seed=0,  # the base's own seed (init and SFT data); config.seed is the RL seed
      # 1,500 steps (was 600): a base that still follows the flawed procedures greedily
      # but gets the arithmetic right more often, so RL has more to gain (docs/history.md,
      # "Recipe search", validation split).
      steps=1500,
      batch_size=48,
      learning_rate=3e-3,
      warmup_steps=100,
      weight_decay=0.01,
      grad_clip_norm=1.0,
      mix=dict(text=1.0, image=1.0, video=1.0),
      # Fraction of each capability's demonstrations that show its flawed procedure
      # (copd_jax/data/toy_flaws.py, FLAW_KINDS): the base samples the right procedure at
      # temperature 1 but does not prefer it greedily, so RL has something to sharpen.
      # 0.7: greedy decoding follows the flawed procedure almost always, while about a
      # third of temperature-1 samples use the right one (pass@8 >> pass@1).
      flaw_rate=dict(text=0.7, image=0.7, video=0.7),
      checkpoint_dir="",  # empty: <workdir>/base_policy
      reuse_checkpoint=True,  # load a matching saved base instead of retraining
      log_every=50,
  ))


def grpo(c: ml_collections.ConfigDict) -> None:
  """c.rl: the trainer's section (default_config.rl_skeleton) with the GRPO recipe of
  every RL method: budget, batch, optimizer and policy loss."""
  c.rl = ml_collections.ConfigDict(dict(
      # Capabilities this method trains and evaluates (the base always sees all of
      # config.tasks.capabilities); one branch each for experts / CoPD.
      capabilities=CAPABILITIES,
      # Budget: `steps` is ONE expert's optimizer steps. Experts: each branch runs `steps`;
      # mixed RLVR: one branch runs steps x number of capabilities (the sum of the
      # experts'); CoPD: each branch runs `steps` (same sum of branch-steps).
      steps=60,
      native_prompts=16,      # GRPO prompts per branch per step
      samples_per_prompt=8,   # G (the paper: 8)
      # Chosen with experiments/tune_rl.py on the validation split (toy_tasks.validation_set),
      # never on the eval set: 1e-3 made the experts worse within 10 steps, 3e-5 moved no
      # weight by more than 1e-3 in 30 steps (docs/history.md).
      learning_rate=3e-4,
      # "constant" (the paper's) or "cosine": decay from learning_rate to
      # lr_end_fraction x learning_rate over each stage's steps. Cosine keeps what the
      # first steps gain (a constant 3e-4 swung accuracy by +-10 points); the floor of 0.3
      # keeps independent experts drifting apart after mid-run (docs/history.md).
      lr_schedule="cosine",
      lr_end_fraction=0.3,
      grad_clip_norm=1.0,
      weight_decay=0.0,
      scale_by_std=True,      # GRPO; False = Dr.GRPO
      loss=dict(eps_low=0.2, eps_high=0.28, kl_coef=0.0, kl_estimator="k3",
                entropy_coef=0.0, aggregation="token_mean", opd_student_logprob="old",
                # Truncated importance sampling: weight each token's PG term by
                # min(pi_trainer / pi_sampler, tis_cap); 0 = off (e.g. 2.0 with bf16 sampling).
                tis_cap=0.0),
  ))
  c.rl.update(default_config.rl_skeleton())  # after the recipe: --help lists it first


def toy_method(method: str) -> ml_collections.ConfigDict:
  """The skeleton with the toy base and the GRPO recipe, for `method` (one branch per
  rl.capabilities; base and mixed RLVR: one policy). A method's config states the rest."""
  c = default_config.skeleton()
  c.method = method
  toy_base(c)
  grpo(c)
  c.num_experts = 1 if method in ("base", "mixed_rlvr") else len(c.rl.capabilities)
  return c
