"""Our side of the comparison with google/tunix's GRPO: one GRPO step with a KL to a
reference model, on tunix's toy shape, through the library's own sampler and update.

    python experiments/bench_peer.py [--quick] [--dtypes float32,bfloat16]
        [--whole_rows] [--backend chunked|reference|pallas]

--whole_rows runs every row whole in the update (prompt_len 0, as tunix does) instead of
each prompt once for its G samples; --backend picks the fused LM-head loss backend. Both
change how the same loss is computed, for A/B runs of the update path.

Shape: a tiny Qwen3 (the bench shape's decoder -- d_model 256, 4 layers, 4 query / 2 KV
heads of 64, SwiGLU 768 -- with the Qwen3 fixture's padded vocabulary of 352 and an untied
head: 3.33M parameters, random weights), 16 prompts of 64 tokens (left-padded, 32 to 64
real tokens) x G = 8 samples x 64 new tokens (no stop token: every response runs to its
full length), one optimizer step per batch (AdamW, global-norm clip), PPO clip 0.2, k3
KL to a frozen reference (kl_coef 0.04), rewards from a cheap host function of the tokens.
One device, one branch (S = 1).

A step is what tunix's GRPO learner does per batch: sample (sampling.sampler_program),
rewards and group advantages on the host (rollout.group_advantages, rollout.build_rows),
then rl.update.update, one program that scores the rows under the reference, takes the
loss and gradients and applies the optimizer. Figures per compute dtype (medians over
interleaved repeats after a warm-up, compile time excluded):
  grpo_step_s            one whole step, sampling to updated parameters
  sampler_tokens_per_s   16 x 8 x 64 sampled tokens / sampling seconds
  sampling_s, host_s, update_s   the step's parts (update_s includes reference scoring)
  reference_scoring_s    the reference scoring alone (rl.scoring.reference_logprobs,
                         jitted on the same rows): the share of update_s it takes
  update_without_scoring_s   update_s - reference_scoring_s
Last line: one JSON object. Tunix itself is not needed (see experiments/peer/ for the
tunix side of the comparison, which needs it installed).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from copd_jax import kernels, losses, policy_setup, sampling  # noqa: E402
from copd_jax.models import decoder as model_lib, model_config  # noqa: E402
from copd_jax.rl import rollout as rollout_lib, rows as rows_lib, scoring  # noqa: E402
from copd_jax.rl import update as update_lib  # noqa: E402
from copd_jax.sharding import RunSharding  # noqa: E402
from experiments.bench_copd import cpu_name  # noqa: E402

# The shape (tunix's toy GRPO comparison).
PROMPTS, SAMPLES, NEW_TOKENS, PROMPT_LEN = 16, 8, 64, 64
PEER_MODEL = dict(vocab_size=352, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=64, mlp_dim=768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_embeddings=False)
KL_COEF, CLIP_EPS, LEARNING_RATE, GRAD_CLIP = 0.04, 0.2, 1e-5, 1.0


def peer_model(dtype: str) -> model_config.ModelConfig:
  return model_config.ModelConfig(**PEER_MODEL, dtype=dtype)


def make_prompts(rng: np.random.Generator, batch: int, length: int, vocab: int):
  """Left-padded random prompts of length//2 .. length tokens (ids 4 .. vocab-1).
  Returns (tokens int32[B, P], mask bool[B, P]) as numpy."""
  lengths = rng.integers(length // 2, length + 1, size=batch)
  mask = np.arange(length)[None, :] >= (length - lengths)[:, None]
  tokens = rng.integers(4, vocab, size=(batch, length)).astype(np.int32)
  return np.where(mask, tokens, 0).astype(np.int32), mask


def toy_rewards(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """A cheap verifiable reward per response: the fraction of its tokens with an even id.
  tokens, mask: [..., R] -> f32[...]."""
  even = ((tokens % 2) == 0) & (mask > 0)
  return (even.sum(-1) / np.maximum((mask > 0).sum(-1), 1)).astype(np.float32)


class CompileCounter(logging.Handler):
  """Counts XLA compilations (jax's 'Finished XLA compilation' log records) inside
  `with counter.counting():` blocks: a timed step must compile nothing."""

  def __init__(self):
    super().__init__()
    self.total = 0

  def emit(self, record):
    if record.getMessage().startswith("Finished XLA compilation"):
      self.total += 1

  @contextlib.contextmanager
  def counting(self):
    logger = logging.getLogger("jax")
    logger.addHandler(self)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
      yield self
    finally:
      jax.config.update("jax_log_compiles", previous)
      logger.removeHandler(self)


class PeerStep:
  """One GRPO step of one policy (S = 1) on the issue's shape, in one compute dtype."""

  def __init__(self, dtype: str, seed: int = 0, whole_rows: bool = False,
               backend: str = "chunked"):
    self.cfg = peer_model(dtype)
    # The update runs each prompt once for its G rows (prompt_len P), or every row whole
    # over all its columns (0), as tunix does; the same loss either way.
    self.update_prompt_len = 0 if whole_rows else PROMPT_LEN
    self.run = RunSharding.one_device(policy_setup.declared_param_axes(self.cfg))
    params = model_lib.init_params(self.cfg, jax.random.key(seed))
    self.ref_params = params  # the frozen reference starts where the policy does
    self.params = jax.tree.map(lambda x: x[None], params)  # stacked [S = 1, ...]
    self.sampling = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS)
    loss = losses.PolicyLossConfig(eps_low=CLIP_EPS, eps_high=CLIP_EPS, kl_coef=KL_COEF,
                                   kl_estimator="k3")
    self.ucfg = rows_lib.UpdateConfig(model=self.cfg, loss=loss,
                                      kernel=kernels.KernelConfig(backend=backend),
                                      samples_per_prompt=SAMPLES)
    self.optimizer = update_lib.make_optimizer(LEARNING_RATE, GRAD_CLIP)
    self.opt_state = update_lib.init_optimizer_state(self.optimizer, self.params)
    # Placed as the update program returns them (the mesh's shardings, not a bare device):
    # then the second step's arguments have the first's shardings, and nothing recompiles.
    self.params, self.opt_state, self.ref_params = jax.device_put(
        (self.params, self.opt_state, self.ref_params),
        (self.run.stacked_params(self.params), self.run.opt_state(self.opt_state),
         self.run.stacked_params(self.ref_params, stacked=False)))
    self.sampler = sampling.sampler_program(
        self.run, sampling.Sampler(self.cfg, self.sampling, SAMPLES))
    self.update_fn = update_lib.UpdateFn(self.run, self.ucfg, self.optimizer)
    self.ref_scoring = jax.jit(lambda ref, rows: scoring.reference_logprobs(ref, rows, self.ucfg))
    rng = np.random.default_rng(seed)
    tokens, mask = make_prompts(rng, PROMPTS, PROMPT_LEN, self.cfg.vocab_size)
    self.prompt_tokens, self.prompt_mask = tokens[None], mask[None]  # [S = 1, B, P]
    self.step_index = 0
    self.last_rows = None

  def sample(self):
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(1), self.step_index))[None]
    return self.sampler(self.params, sampling.Prompts(self.prompt_tokens, self.prompt_mask),
                        np.asarray(key))

  def rows(self, rollout) -> rows_lib.Rows:
    """Host: rewards, group advantages and the update's rows."""
    host = jax.device_get(rollout)
    rewards = toy_rewards(host.tokens, host.mask).reshape(1, -1)  # [S, B*G]
    advantages, _ = rollout_lib.group_advantages(rewards, SAMPLES, self.ucfg.scale_by_std)
    rows = rollout_lib.build_rows(sampling.Prompts(self.prompt_tokens, self.prompt_mask), host,
                                  advantages, np.zeros_like(advantages))
    return dataclasses.replace(rows, prompt_len=self.update_prompt_len)

  def update(self, rows):
    state, metrics = update_lib.update(self.update_fn,
                                       update_lib.TrainState(self.params, self.opt_state), rows,
                                       None, self.ref_params)
    return state.params, state.opt_state, metrics

  def step(self) -> dict:
    """One whole GRPO step (the parameters and optimizer state advance). Returns the
    seconds of each part."""
    t0 = time.perf_counter()
    rollout = jax.block_until_ready(self.sample())
    t1 = time.perf_counter()
    rows = self.rows(rollout)
    t2 = time.perf_counter()
    params, opt_state, metrics = self.update(rows)
    jax.block_until_ready((params, opt_state, metrics))
    t3 = time.perf_counter()
    self.params, self.opt_state, self.last_rows = params, opt_state, rows
    self.step_index += 1
    self.metrics = metrics
    return {"grpo_step_s": t3 - t0, "sampling_s": t1 - t0, "host_s": t2 - t1,
            "update_s": t3 - t2}

  def scoring_time(self) -> float:
    rows = jax.tree.map(lambda x: x[0], self.last_rows)
    rows = jax.tree.map(lambda x: x[None], rows)
    t0 = time.perf_counter()
    jax.block_until_ready(self.ref_scoring(self.ref_params, rows))
    return time.perf_counter() - t0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats")
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="comma-separated compute dtypes")
  parser.add_argument("--whole_rows", action="store_true",
                      help="the update runs every row whole (prompt_len 0) instead of each "
                      "prompt once for its G samples")
  parser.add_argument("--backend", default="chunked", choices=kernels.BACKENDS,
                      help="the fused LM-head loss backend of the update")
  args = parser.parse_args(argv)
  dtypes = args.dtypes.split(",")
  repeats = 2 if args.quick else 7
  benches = {dt: PeerStep(dt, whole_rows=args.whole_rows, backend=args.backend)
             for dt in dtypes}
  n_params = model_lib.count_params(benches[dtypes[0]].ref_params)
  print(f"peer shape: tiny Qwen3 {n_params:,} params, {PROMPTS} prompts x G={SAMPLES} x "
        f"{NEW_TOKENS} new tokens, prompt {PROMPT_LEN}, KL to a reference (k3, {KL_COEF}); "
        f"jax {jax.__version__}, backend {jax.default_backend()}; CPU: {cpu_name()}",
        flush=True)
  for dt, b in benches.items():  # warm-up: compiles every program
    t0 = time.perf_counter()
    b.step()
    b.scoring_time()
    print(f"[{dt}] first step (compiles) {time.perf_counter() - t0:.1f} s", flush=True)

  times = {dt: [] for dt in dtypes}
  scoring_s = {dt: [] for dt in dtypes}
  counter = CompileCounter()
  logging.getLogger("jax").propagate = False  # the compile records go to the counter only
  with counter.counting():
    for _ in range(repeats):  # interleaved: the machine is shared and its load drifts
      for dt, b in benches.items():
        times[dt].append(b.step())
        scoring_s[dt].append(b.scoring_time())

  results = {"quick": args.quick, "cpu": cpu_name(), "jax": jax.__version__,
             "params": n_params, "prompts": PROMPTS, "samples": SAMPLES,
             "new_tokens": NEW_TOKENS, "prompt_len": PROMPT_LEN, "repeats": repeats,
             "compiles_while_timed": counter.total, "whole_rows": args.whole_rows,
             "backend": args.backend}
  tokens = PROMPTS * SAMPLES * NEW_TOKENS
  for dt in dtypes:
    med = {k: statistics.median(t[k] for t in times[dt]) for k in times[dt][0]}
    med["reference_scoring_s"] = statistics.median(scoring_s[dt])
    med["update_without_scoring_s"] = med["update_s"] - med["reference_scoring_s"]
    med["sampler_tokens_per_s"] = tokens / med["sampling_s"]
    finite = bool(np.all(np.asarray(benches[dt].metrics["update_applied"]) == 1.0))
    med["update_applied"] = finite
    tag = "f32" if dt == "float32" else "bf16"
    print(f"[{dt}] grpo_step_s {med['grpo_step_s']:.3f} = sampling {med['sampling_s']:.3f} "
          f"+ host {med['host_s']:.3f} + update {med['update_s']:.3f} (reference scoring "
          f"{med['reference_scoring_s']:.3f}); sampler_tokens_per_s "
          f"{med['sampler_tokens_per_s']:.0f}; update applied: {finite}", flush=True)
    results[tag] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in med.items()}
    results[f"grpo_step_s_{tag}"] = results[tag]["grpo_step_s"]
    results[f"sampler_tokens_per_s_{tag}"] = results[tag]["sampler_tokens_per_s"]
  print(json.dumps(results))


if __name__ == "__main__":
  main()
