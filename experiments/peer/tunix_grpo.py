"""NEEDS google-tunix (not a dependency of copd-jax; no test imports this file).

Tunix's side of experiments/bench_peer.py, run alternately with ours in one process:
google/tunix's GRPOLearner (its vanilla rollout, reference model and trainer) on the same
tiny Qwen3 and the same work -- 16 prompts x G = 8 samples x 64 new tokens, prompts of
64 columns (the same token ids), KL to a reference (beta 0.04), PPO clip 0.2, AdamW with
global-norm clip 1.0, one optimizer step per batch -- and between two tunix steps one step
of ours (bench_peer.PeerStep) in the same compute dtype, so both see the same machine
load.

    python3 -m venv tunix_venv && tunix_venv/bin/pip install jax==0.10.2 google-tunix==0.1.7
    tunix_venv/bin/python experiments/peer/tunix_grpo.py [--steps 4] [--dtypes float32,bfloat16]

(Our package is read from this checkout through sys.path; tunix 0.1.7 pins the same jax,
flax and optax as copd-jax.) Tunix's step is timed from its learner's own calls: the
rollout (RLCluster.generate), the reference log-probs (get_ref_per_token_logps) and the
update (update_actor), each blocked on its result; its whole step is the time between the
starts of two consecutive rollouts less the time our step took in between (so it includes
tunix's rewards, advantages, metrics and queue overhead). Prompts are token ids written as
text ("5 17 42"), read back by a whitespace tokenizer, so both sides sample after the
same ids.
Last line: one JSON object with both sides' medians and the ratios (tunix / ours).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import bench_peer  # noqa: E402

PAD_ID, EOS_ID = 0, 1


class IdTokenizer:
  """Token ids written as whitespace-separated integers (what tunix's rollout tokenizes)."""

  def encode(self, text: str, **_) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None

  def eos_id(self) -> int:
    return EOS_ID

  def pad_id(self) -> int:
    return PAD_ID


def even_fraction_reward(prompts, completions, **_) -> list[float]:
  """The same reward as bench_peer.toy_rewards: the fraction of even ids in a response."""
  out = []
  for text in completions:
    ids = [int(t) for t in text.split()]
    out.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
  return out


def tunix_learner(dtype: str, steps: int):
  from tunix.models.qwen3 import model as qwen3
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  m = bench_peer.PEER_MODEL
  compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  config = qwen3.ModelConfig(
      num_layers=m["num_layers"], vocab_size=m["vocab_size"], embed_dim=m["d_model"],
      hidden_dim=m["mlp_dim"], num_heads=m["num_heads"], head_dim=m["head_dim"],
      num_kv_heads=m["num_kv_heads"], rope_theta=int(m["rope_theta"]),
      norm_eps=m["rms_norm_eps"], use_tied_embedding=m["tie_embeddings"], dtype=compute,
      param_dtype=jnp.float32)
  # Auto axes, as tunix's own examples build their meshes (its sampler's cache updates
  # fail under jax.make_mesh's default Explicit axes).
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  actor = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
  reference = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(actor, nnx.Param)))
  optimizer = optax.chain(optax.clip_by_global_norm(bench_peer.GRAD_CLIP),
                          optax.adamw(bench_peer.LEARNING_RATE))
  training = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optimizer, eval_every_n_steps=10 ** 9, max_steps=steps)
  rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=bench_peer.NEW_TOKENS, max_prompt_length=bench_peer.PROMPT_LEN,
      temperature=1.0, top_p=1.0, top_k=None,
      kv_cache_size=bench_peer.PROMPT_LEN + bench_peer.NEW_TOKENS + 8)
  roles = rl_cluster_lib.Role
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, reference=reference, tokenizer=IdTokenizer(),
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
          rollout_engine="vanilla", offload_to_cpu=False, training_config=training,
          rollout_config=rollout))
  algo = grpo_learner.GRPOConfig(num_generations=bench_peer.SAMPLES, num_iterations=1,
                                 beta=bench_peer.KL_COEF, epsilon=bench_peer.CLIP_EPS)
  return grpo_learner.GRPOLearner(cluster, algo, reward_fns=[even_fraction_reward]), n_params


class PhaseTimer:
  """Wraps an object's method: records (start, seconds) per call, blocking on results."""

  def __init__(self, owner, name: str, block=None):
    self.calls: list[tuple[float, float]] = []
    real = getattr(owner, name)

    def timed(*args, **kwargs):
      t0 = time.perf_counter()
      out = real(*args, **kwargs)
      jax.block_until_ready(out if block is None else block())
      self.calls.append((t0, time.perf_counter() - t0))
      return out
    setattr(owner, name, timed)


def run_dtype(dtype: str, steps: int) -> dict:
  """tunix's learner over `steps` + 1 batches (the first compiles), in a worker thread;
  between two of its steps, one step of ours (warmed up first) in this thread, while
  tunix's data iterator waits. Returns per-step seconds of both sides and how many
  programs of ours compiled during the timed steps (0 expected)."""
  # Tunix first: building its learner changes jax state that our programs' cache keys
  # read (warming ours up before it made our first timed step compile again).
  learner, n_params = tunix_learner(dtype, steps + 1)
  ours = bench_peer.PeerStep(dtype)
  ours.step()  # compile
  ours.scoring_time()
  cluster = learner.rl_cluster
  generate = PhaseTimer(cluster, "generate")
  ref = PhaseTimer(cluster, "get_ref_per_token_logps")
  update = PhaseTimer(cluster, "update_actor",
                      block=lambda: nnx.state(cluster.actor_trainer.model))
  tokens, mask = bench_peer.make_prompts(np.random.default_rng(0), bench_peer.PROMPTS,
                                         bench_peer.PROMPT_LEN, bench_peer.PEER_MODEL["vocab_size"])
  prompts = [" ".join(str(int(t)) for t, m in zip(row, keep) if m)
             for row, keep in zip(tokens, mask)]
  tunix_idle, ours_turn = threading.Semaphore(0), threading.Semaphore(0)
  waits = []  # (start, seconds) tunix's iterator spent waiting for our step

  def batches():
    for i in range(steps + 1):
      if i > 0:  # tunix step i-1 is done: our turn
        t0 = time.perf_counter()
        ours_turn.release()
        tunix_idle.acquire()
        waits.append((t0, time.perf_counter() - t0))
      yield {"prompts": np.asarray(prompts)}  # an array: tunix repeats it G times

  error = []

  def train():
    try:
      learner.train(batches())
    except BaseException as e:  # noqa: BLE001 -- reported by the main thread
      error.append(e)
    finally:
      ours_turn.release()

  worker = threading.Thread(target=train)
  counter = bench_peer.CompileCounter()
  ours_steps = []
  worker.start()
  for _ in range(steps):
    ours_turn.acquire()
    if error or not worker.is_alive():
      break
    with counter.counting():
      ours_steps.append(ours.step())
      ours_steps[-1]["reference_scoring_s"] = ours.scoring_time()
    tunix_idle.release()
  worker.join()
  t_end = time.perf_counter()
  if error:
    raise error[0]
  starts = [s for s, _ in generate.calls] + [t_end]
  tunix_steps = []
  for i in range(len(generate.calls)):
    between = sum(d for s, d in waits if starts[i] <= s < starts[i + 1])
    tunix_steps.append({"grpo_step_s": starts[i + 1] - starts[i] - between,
                        "sampling_s": generate.calls[i][1],
                        "reference_scoring_s": ref.calls[i][1] if i < len(ref.calls) else None,
                        "update_s": update.calls[i][1] if i < len(update.calls) else None})
  return {"tunix": tunix_steps[1:], "ours": ours_steps, "params": n_params,
          "ours_compiles_while_timed": counter.total}


def medians(rows: list[dict]) -> dict:
  keys = [k for k in rows[0] if all(isinstance(r.get(k), float) for r in rows)]
  return {k: statistics.median(r[k] for r in rows) for k in keys}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
  parser.add_argument("--steps", type=int, default=4, help="timed steps per side and dtype")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  args = parser.parse_args(argv)
  import importlib.metadata as md
  versions = {name: md.version(name) for name in ("google-tunix", "jax", "flax", "optax")}
  tokens = bench_peer.PROMPTS * bench_peer.SAMPLES * bench_peer.NEW_TOKENS
  results = {"versions": versions, "cpu": bench_peer.cpu_name(), "steps": args.steps}
  for dtype in args.dtypes.split(","):
    got = run_dtype(dtype, args.steps)
    tag = "f32" if dtype == "float32" else "bf16"
    side = {name: medians(got[name]) for name in ("tunix", "ours")}
    for s in side.values():
      s["sampler_tokens_per_s"] = tokens / s["sampling_s"]
    ratios = {"grpo_step_speedup": side["tunix"]["grpo_step_s"] / side["ours"]["grpo_step_s"],
              "sampler_speedup": side["ours"]["sampler_tokens_per_s"]
              / side["tunix"]["sampler_tokens_per_s"]}
    print(f"[{dtype}] tunix ({got['params']:,} params): step {side['tunix']['grpo_step_s']:.2f} s "
          f"(sampling {side['tunix']['sampling_s']:.2f}, reference "
          f"{side['tunix'].get('reference_scoring_s', float('nan')):.2f}, update "
          f"{side['tunix'].get('update_s', float('nan')):.2f}); ours: step "
          f"{side['ours']['grpo_step_s']:.2f} s (sampling {side['ours']['sampling_s']:.2f}, "
          f"update {side['ours']['update_s']:.2f}) -> step {ratios['grpo_step_speedup']:.2f}x, "
          f"sampler {ratios['sampler_speedup']:.2f}x", flush=True)
    results[tag] = {"tunix": side["tunix"], "ours": side["ours"], **ratios,
                    "per_step": got}
    print(json.dumps({tag: results[tag]}), flush=True)  # kept if a later dtype fails
  print(json.dumps(results))


if __name__ == "__main__":
  main()
