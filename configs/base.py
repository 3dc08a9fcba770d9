"""Base policy: SFT warm-start on the toy suite, then per-capability evaluation.

Every other method starts from the policy this config produces. Presets:
  python -m copd_jax.main --config=configs/base.py          # toy (README figures)
  python -m copd_jax.main --config=configs/base.py:micro    # seconds; used by tests
"""
import ml_collections

CAPABILITIES = ("text", "image", "video")


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
      image_token_id=3,  # ToyTokenizer's <img> placeholder
      vision=dict(image_size=32, patch_size=8, channels=3, num_frames=4,
                  tubelet=2, width=64, depth=2, num_heads=4, mlp_dim=128),
  ))


def get_config(preset: str = "toy") -> ml_collections.ConfigDict:
  if preset not in ("toy", "micro"):
    raise ValueError(f"configs/base.py: unknown preset {preset!r}; use 'toy' or 'micro'")
  c = ml_collections.ConfigDict()
  c.method = "base"
  c.seed = 0
  c.workdir = "runs/base"
  c.num_experts = 1

  c.model = toy_model()

  c.tasks = ml_collections.ConfigDict(dict(
      capabilities=CAPABILITIES,
      # The difficulty knob of each generator (see copd_jax/tasks.py).
      difficulty=dict(text=2, image=2, video=2),
      seed=1234,  # task-suite seed: train stream and held-out set derive from it
  ))
  c.data = ml_collections.ConfigDict(dict(max_prompt_len=64, max_response_len=24))

  # SFT warm-start: the analog of the paper's instruction-tuned base. `mix` sets how
  # much of each capability the base sees, i.e. where each capability starts.
  c.warm_start = ml_collections.ConfigDict(dict(
      steps=1500,
      batch_size=48,
      learning_rate=3e-3,
      warmup_steps=100,
      weight_decay=0.01,
      grad_clip_norm=1.0,
      mix=dict(text=1.0, image=1.0, video=1.0),
      checkpoint_dir="",  # empty: <workdir>/base_policy
      reuse_checkpoint=True,  # load a matching saved base instead of retraining
      log_every=50,
  ))

  c.eval = ml_collections.ConfigDict(dict(num_examples=128, batch_size=128))
  c.sampling = ml_collections.ConfigDict(dict(
      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=24))

  if preset == "micro":
    c.workdir = "runs/micro"
    c.model.update(dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        head_dim=16, mlp_dim=64, dtype="float32"))
    c.model.vision.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32))
    c.tasks.difficulty = dict(text=1, image=1, video=1)
    c.warm_start.update(dict(steps=4, batch_size=6, warmup_steps=1, log_every=2))
    c.eval.update(dict(num_examples=6, batch_size=6))
  return c
