"""The CoPD training step, measured: batched cross-expert scoring against a loop of per-pair
calls, an OPD step against an RL step on the same rollouts, where a step's time goes, the
step's useful FLOP rate against this machine's matmul peak, and compiles per stage.

    python experiments/bench_copd.py [--quick] [--dtype float32]

--quick measures every figure at a smaller shape (QUICK_SHAPE: 4 native + 4 cross prompts
x G = 4 per branch, 16 response tokens; the same model) with 2 repeats and 4 steps: a few
minutes and under 3 GiB on a 2-core CPU (the full shape's whole-row update alone holds
about 3 GiB of activations). Its figures are ratios of the same kind as the full run's,
at a shape where fixed per-call costs weigh more.

Shape (the "bench shape"): the toy suite's Qwen3-layout decoder widened to d_model 256
(4 layers, 4 query / 2 KV heads of 64, SwiGLU 768, vocabulary 64 = the toy tokenizer's,
tubelet ViT), three branches (text, image, video; hub = text), 16 native prompts x G = 8
samples per branch, 8 cross prompts on OPD steps, prompts of 64 and responses of 24 tokens,
random weights (so responses run to their full length). Everything runs through the
library's own step (StageTrainer.rollout + StageTrainer.update), single device.

Figures (medians over repeated, interleaved runs after a warm-up; compile time excluded):
  scoring_batched_vs_loop: one vmapped teacher call over all (student, teacher) pairs
    (scoring_lib.score_by_teachers, the all-to-all layout) against a loop of one jitted call per
    pair on the same cross rows; > 1 = batched is faster. The results are checked equal.
  opd_step_over_rl_step: a whole OPD step (sampling, verification, update with teacher
    scoring) over the same step without distillation, on the same rollouts.
  step_time_split: shares of an OPD step: sampling, verification, teacher scoring, the rest
    of the update (rl_step_time_split: the same for an RL step, no scoring).
  step_flops_per_s_over_dot_peak: useful FLOPs of an RL step per second over the f32 (or
    --dtype) jnp.dot peak measured in this run. Useful = the matmul FLOPs the step needs:
    sampling (each prompt prefilled once, then one token per decode step per sample), and
    the update's forward + backward (3x forward) over each prompt once and each response.
  compiles_per_stage: compilations of each update program over the steps of one stage
    (RL and OPD steps are two programs; each should compile once): the largest count.
  prompt_once_update_speedup: the same RL update with every row run whole over all its
    columns (prompt_len 0: the update before this benchmark existed) over the update that
    runs each prompt once for its G samples and the LM head on response columns only.
  topk_opd_step_over_sampled_token_step: a whole OPD step (sampling, verification, update)
    with rl.opd.estimator top_k (k = 16: teachers send 16 log-probs and ids per token, the
    student's loss adds the renormalised reverse KL) over the same step with the paper's
    sampled_token estimator, same rollouts, updates timed interleaved.
  tis_applied: an OPD update with rl.loss.tis_cap = 2 reports tis/applied = 1 for every
    branch in its metrics (tis_weight_mean: its mean truncated importance weight).
  teacher_useful_rows_fraction: per topology (hub_3, full_3, hub_6, full_6: hub or full
    with 3 or 6 branches, this bench's prompts per branch), the cross rows that have a
    teacher over the rows the teacher forwards of score_by_teachers compute, counted from
    the traced program's shapes (analysis.teacher_rows: each teacher_forward call's output
    shape, times its jax.lax.map trips) on one device. teacher_useful_rows_fraction_
    expert_mesh: the same for the layout an `expert` axis of several device groups gets
    (calls of one shape over the lanes, in rounds of the balanced lane plan
    teacher_lanes.lane_plan: the hub's overflow chunks run on the spokes' lanes).
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from copd_jax.config_lib import spec_of
from copd_jax import default_config, policy_setup  # noqa: E402
from copd_jax.analysis import teacher_rows as teacher_rows_audit  # noqa: E402
from copd_jax.models import decoder as model_lib, model_config, stacked as experts
from copd_jax.rl import (
  loop,
  methods,
  rollout as trainer,
  rows as rows_lib,
  schedules as schedules_lib,
  scoring as scoring_lib,
  stages,
  stages as stages_lib,
  step as step_lib,
  update as update_lib,
)
from experiments.bench_sampler import decode_flops_per_token, matmul_peak_flops, time_side_by_side  # noqa: E402

# The jitted update's name in jax's "Finished XLA compilation of jit(<name>)" log lines.
UPDATE_JIT_NAME = update_lib._update_on_mesh.__name__

BENCH_MODEL = dict(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                   mlp_dim=768)
# --quick: fewer rows per branch (4 + 4 prompts x G = 4 = 32 rows instead of 192) and
# shorter responses; the model, the three branches and the hub topology stay.
QUICK_SHAPE = dict(native_prompts=4, cross_prompts=4, samples_per_prompt=4, max_new_tokens=16)


def peak_rss_gib() -> float:
  """This process's peak resident memory so far (GiB; Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def progress(phase: str) -> None:
  print(f"[memory] after {phase}: peak RSS {peak_rss_gib():.2f} GiB", flush=True)


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = next((l.split(":", 1)[1].strip() for l in out.splitlines()
                 if l.startswith("Model name")), platform.processor())
    amx = "amx" in out.lower()
    return f"{name}, {os.cpu_count()} cores, AMX {'yes' if amx else 'no'}"
  except OSError:
    return platform.processor()


# ----------------------------------------------------------------------- FLOP accounting

def _vision_flops(cfg: model_config.ModelConfig) -> float:
  """Forward FLOPs of the toy vision tower on one clip (patch embed, blocks, merger)."""
  v = cfg.vision
  if v is None:
    return 0.0
  n, w = v.num_tokens, v.width
  block = 4 * w * w + 2 * w * v.mlp_dim + 2 * n * w  # qkv+o, MLP, attention per token
  return 2.0 * n * (v.patch_dim * w + v.depth * block + w * cfg.d_model)


def forward_flops(cfg, prompts: int, samples: int, prompt_len: int, new_tokens: int) -> float:
  """One forward over each prompt once (with its clip) and each sample's response tokens:
  what sampling does (prefill, then one token per decode step) and what the update's
  forward does (prompt once, response columns per row)."""
  prefill = prompts * (prompt_len * decode_flops_per_token(cfg, prompt_len / 2)
                       + _vision_flops(cfg))
  responses = prompts * samples * new_tokens * decode_flops_per_token(
      cfg, prompt_len + new_tokens / 2)
  return prefill + responses


# ------------------------------------------------------------------------- compile count

class CompileCounter(logging.Handler):
  """Counts 'Finished XLA compilation of jit(<name>)' log records per function name."""

  def __init__(self):
    super().__init__()
    self.counts: dict[str, int] = {}

  def emit(self, record):
    msg = record.getMessage()
    if msg.startswith("Finished XLA compilation of jit("):
      name = msg[len("Finished XLA compilation of jit("):].split(")", 1)[0]
      self.counts[name] = self.counts.get(name, 0) + 1


# --------------------------------------------------------------------------------- setup

def bench_config(dtype: str, quick: bool = False):
  cfg = default_config.get("copd")
  cfg.model.update(dict(BENCH_MODEL, dtype=dtype))
  if quick:
    q = QUICK_SHAPE
    cfg.rl.update(dict(native_prompts=q["native_prompts"], cross_prompts=q["cross_prompts"],
                       samples_per_prompt=q["samples_per_prompt"]))
    cfg.sampling.max_new_tokens = q["max_new_tokens"]
  cfg.workdir = "/tmp/bench_copd"
  return cfg


@dataclasses.dataclass
class Bench:
  cfg: object
  setup: object
  stage: stages_lib.Stage
  ucfg: rows_lib.UpdateConfig
  optimizer: object
  data: trainer.DataContext
  assignment: np.ndarray
  routing: dict
  key: object
  rng: np.random.Generator


def make_bench(dtype: str, quick: bool = False) -> Bench:
  cfg = spec_of(bench_config(dtype, quick))
  setup = policy_setup.build_setup(cfg)
  caps = tuple(cfg.rl.capabilities)
  stage = stages.copd_stage(cfg.rl, caps)
  ucfg = rows_lib.update_config(cfg, setup.model_cfg)
  optimizer = update_lib.make_optimizer(cfg.rl.learning_rate, cfg.rl.grad_clip_norm)
  assignment = stages_lib.cross_teacher_assignment(stage)
  routing = stages_lib.teacher_routing(
      assignment, len(stage.teacher_data), stage.samples_per_prompt,
      native_rows=stage.native_prompts * stage.samples_per_prompt).as_arrays()
  return Bench(cfg, setup, stage, ucfg, optimizer, loop.data_context(cfg, setup, 0),
               assignment, routing, jax.random.key(0), np.random.default_rng(0))


_RUNS: dict = {}  # one RunSharding per bench: the programs compile once


def stage_trainer(b: Bench) -> step_lib.StageTrainer:
  """The library's StageTrainer of the bench's stage (live teachers, no KL reference)."""
  if id(b) not in _RUNS:
    run = methods.run_sharding(b.cfg, b.setup.model_cfg)
    _RUNS[id(b)] = step_lib.StageTrainer(
        b.stage,
        trainer.StageRollout(b.stage, b.data, run, b.ucfg.model, b.key, b.assignment,
                             b.ucfg.scale_by_std),
        update_lib.StageUpdate(update_lib.UpdateFn(run, b.ucfg, b.optimizer),
                               jax.device_get(b.routing),
                               b.stage.native_prompts * b.stage.samples_per_prompt))
  return _RUNS[id(b)]


def rollouts(b: Bench, params, step: int, weight: float) -> trainer.Rollouts:
  return stage_trainer(b).rollout(step_lib.TrainState(params, None), step, weight, b.rng)


def update_fn(b: Bench, params, opt_state, got: trainer.Rollouts):
  state = step_lib.TrainState(params, opt_state)
  return lambda: stage_trainer(b).update(state, got, params)[1]


# --------------------------------------------------------------------- scoring vs a loop

def per_pair_scoring(b: Bench, params, rows: rows_lib.Rows, prompt_len: int):
  """(fn, pairs): a loop of one jitted teacher call per (student, teacher) pair over that
  pair's cross rows (whole prompts), and the pairs [(student, teacher, row indices)]."""
  g = b.stage.samples_per_prompt
  native_rows = b.stage.native_prompts * g
  pairs = []
  for k in range(b.assignment.shape[0]):
    for j in sorted(set(b.assignment[k].tolist())):
      prompts = np.flatnonzero(b.assignment[k] == j)
      idx = (native_rows + prompts[:, None] * g + np.arange(g)).reshape(-1)
      pairs.append((k, j, idx))

  @jax.jit
  def score(teacher, tokens, positions, mask, frames):
    return scoring_lib._sequence_logprobs(
        teacher, b.ucfg, rows_lib.RowInputs(tokens, positions, mask, frames), prompt_len)

  host = jax.device_get(rows)
  inputs = [(jax.tree.map(lambda x: x[j], params),
             *(jnp.asarray(getattr(host, f)[k][idx]) for f in
               ("tokens", "positions", "token_mask", "frames"))) for k, j, idx in pairs]

  def loop():
    return [score(*args) for args in inputs]
  return loop, pairs


def scoring_comparison(b: Bench, params, got: trainer.Rollouts, repeats: int) -> dict:
  g = b.stage.samples_per_prompt
  start = b.stage.native_prompts * g
  batched = jax.jit(batched_scoring(b, start))
  loop, pairs = per_pair_scoring(b, params, got.rows, got.prompt_len)
  # Same numbers: the batched layout returns each cross row's score in its own row.
  want = np.asarray(batched(params, got.rows, b.routing))
  for (k, _, idx), lp in zip(pairs, loop()):
    mask = np.asarray(rows_lib.loss_columns(got.rows.response_mask[k][idx], got.prompt_len)) > 0
    np.testing.assert_allclose(want[k][idx][mask], np.asarray(lp)[mask], atol=2e-3, rtol=2e-3)
  t = time_side_by_side({"batched": lambda: batched(params, got.rows, b.routing), "loop": loop},
                     repeats)
  cross_rows = sum(len(idx) for _, _, idx in pairs)
  computed, _ = teacher_rows_audit.traced_teacher_rows(batched, params, got.rows, b.routing)
  return {"batched_s": t["batched"], "loop_s": t["loop"], "cross_rows": cross_rows,
          "teacher_forward_rows_batched": computed,
          "speedup": t["loop"] / t["batched"]}


def layout_fraction(b: Bench, rows: rows_lib.Rows, prompt_len: int, kind: str, branches: int,
                    one_shape: bool) -> dict:
  """Useful rows over computed rows of teacher scoring for `branches` branches in topology
  `kind` (hub = branch 0), this bench's prompts per branch: the cross rows that have a
  teacher (the stage's assignment) over what the traced score_by_teachers program's
  teacher forwards compute (nothing runs: shapes only)."""
  st = b.stage
  names = tuple((f"b{i}",) for i in range(branches))
  stage = dataclasses.replace(st, student_data=names, teacher_data=names,
                              topology=schedules_lib.topology_matrix(branches, kind, hub=0),
                              branch_beta=np.ones(branches, np.float32))
  g, start = st.samples_per_prompt, st.native_prompts * st.samples_per_prompt
  assignment = stages_lib.cross_teacher_assignment(stage)
  routing = stages_lib.teacher_routing(assignment, branches, g, start)
  useful = int(np.sum(assignment >= 0)) * g
  params = jax.eval_shape(lambda k: experts.init_stacked(b.setup.model_cfg, k),
                          jax.random.split(jax.random.key(0), branches))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((branches,) + x.shape[1:], x.dtype),
                        rows)

  shapes = dataclasses.replace(shapes, prompt_len=prompt_len)

  def score(p, r, ro):
    return scoring_lib.score_by_teachers(scoring_lib.Teachers(p, ro, start), r, b.ucfg,
                                         one_shape=one_shape)
  computed, calls = teacher_rows_audit.traced_teacher_rows(score, params, shapes,
                                                          routing.as_arrays())
  return {"useful": useful, "computed": computed, "fraction": useful / computed,
          "calls": calls}


def layout_fractions(b: Bench, got: trainer.Rollouts) -> dict:
  out = {}
  for kind in ("hub", "full"):
    for branches in (3, 6):
      for mesh, one_shape in (("one_device", False), ("expert_mesh", True)):
        r = layout_fraction(b, got.rows, got.prompt_len, kind, branches, one_shape)
        out.setdefault(mesh, {})[f"{kind}_{branches}"] = r
        print(f"[teacher rows] {kind}_{branches} {mesh}: {r['useful']} useful of "
              f"{r['computed']} computed ({r['fraction']:.3f}); calls (trips, shape) "
              f"{r['calls']}", flush=True)
  return out


def with_loss(b: Bench, **loss) -> Bench:
  """The bench with other policy-loss settings (e.g. the OPD estimator, the TIS cap)."""
  ucfg = dataclasses.replace(b.ucfg, loss=dataclasses.replace(b.ucfg.loss, **loss))
  return dataclasses.replace(b, ucfg=ucfg)


def batched_scoring(b: Bench, start: int):
  """score_by_teachers for the stage's routing: (params, rows, routing) -> f32[S, R, W]
  (rows.prompt_len: their prompt columns)."""
  def score(params, rows, routing):
    return scoring_lib.score_by_teachers(scoring_lib.Teachers(params, routing, start), rows,
                                         b.ucfg)
  return score


# ---------------------------------------------------------------------------------- main

def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="a smaller shape (QUICK_SHAPE), 2 repeats, 4 steps")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args(argv)
  repeats = 2 if args.quick else 7
  # jax_log_compiles makes jax log every compilation; the counter takes those records (and
  # any other jax log line) instead of the console.
  counter = CompileCounter()
  jax_logger = logging.getLogger("jax")
  jax_logger.handlers = [counter]
  jax_logger.propagate = False
  jax.config.update("jax_log_compiles", True)

  b = make_bench(args.dtype, args.quick)
  cfg, mc = b.cfg, b.setup.model_cfg
  s, g = b.stage.num_students, b.stage.samples_per_prompt
  p_len, r_len = cfg.data.max_prompt_len, cfg.sampling.max_new_tokens
  params = experts.init_stacked(mc, jax.random.split(jax.random.key(1), s))
  # As a stage starts (StageTrainer.init_state): on the run's shardings, as the update's
  # outputs are, so later steps' inputs key jit's cache like the first's (a plain
  # device_put gives a SingleDeviceSharding: the RL program compiled twice).
  first = stage_trainer(b).init_state(params)
  params, opt_state = first.params, first.opt_state
  print(f"bench shape: {model_lib.count_params(jax.tree.map(lambda x: x[0], params)):,} params "
        f"per branch, {s} branches, dtype {args.dtype}, {b.stage.native_prompts} native + "
        f"{b.stage.cross_prompts} cross prompts x G={g}, prompt {p_len} + response {r_len}; "
        f"CPU: {cpu_name()}", flush=True)
  peak = matmul_peak_flops(args.dtype, 2048, repeats)
  print(f"jnp.dot peak ({args.dtype}, 2048^3): {peak / 1e9:.0f} GFLOP/s", flush=True)

  # A stage's steps in the order CoPD runs them (RL, OPD, RL, OPD, ...), each timed whole.
  steps = {"rl": [], "opd": []}
  compiles = {"rl": 0, "opd": 0}
  # Each program's first step compiles and is skipped: at least 2 steps of each kind.
  for step in range(4 if args.quick else 2 * (repeats // 2 + 2)):
    kind = "rl" if step % 2 == 0 else "opd"
    before = counter.counts.get(UPDATE_JIT_NAME, 0)
    result = stage_trainer(b).step(step_lib.TrainState(params, opt_state), step,
                                   0.0 if kind == "rl" else 1.0, b.rng)
    params, opt_state = result.state.params, result.state.opt_state
    steps[kind].append({k: v for k, v in result.metrics.items() if k.startswith("time/")})
    compiles[kind] += counter.counts.get(UPDATE_JIT_NAME, 0) - before
  print(f"update compiles over {sum(len(v) for v in steps.values())} alternating steps: "
        f"RL program {compiles['rl']}, OPD program {compiles['opd']}", flush=True)
  progress("the stage's steps")

  def phase_medians(kind):  # skip each program's first (compiling) step
    rest = steps[kind][1:]
    return {k: statistics.median(r[k] for r in rest) for k in rest[0]}
  rl_t, opd_t = phase_medians("rl"), phase_medians("opd")

  # The same rollouts with and without distillation.
  got = rollouts(b, params, 10_000, 1.0)
  rl_view = dataclasses.replace(got, distil=False)
  t = time_side_by_side({"opd": update_fn(b, params, opt_state, got),
                      "rl": update_fn(b, params, opt_state, rl_view),
                      "topk_opd": update_fn(with_loss(b, opd_estimator="top_k", opd_top_k=16),
                                            params, opt_state, got)}, repeats)
  tis_metrics = update_fn(with_loss(b, tis_cap=2.0), params, opt_state, got)()
  tis_applied = bool(np.all(np.asarray(tis_metrics.get("tis/applied", 0.0)) == 1.0))
  progress("OPD / RL / top-k / TIS updates")
  # Before / after the prompt-once update: the same RL update with every row run whole
  # over all its columns (prompt_len 0, the old path) and with prompt_len P.
  whole_rows = dataclasses.replace(rl_view, prompt_len=0)
  t_whole = time_side_by_side({"whole": update_fn(b, params, opt_state, whole_rows)},
                           repeats)["whole"]
  progress("the whole-row update")
  sample_verify = got.timings["time/sample_s"] + got.timings["time/verify_s"]
  opd_over_rl = (sample_verify + t["opd"]) / (sample_verify + t["rl"])
  topk_over_sampled = (sample_verify + t["topk_opd"]) / (sample_verify + t["opd"])
  print(f"[top-k OPD] update {t['topk_opd']:.2f} s vs sampled-token {t['opd']:.2f} s; whole "
        f"step ratio {topk_over_sampled:.2f}; TIS applied: {tis_applied}", flush=True)
  scoring = scoring_comparison(b, params, got, repeats)
  progress("batched vs per-pair scoring")
  fractions = layout_fractions(b, got)
  progress("the layout audit")
  print(f"[same rollouts] update with OPD {t['opd']:.2f} s, without {t['rl']:.2f} s; whole "
        f"step ratio {opd_over_rl:.2f}", flush=True)
  print(f"[prompt once] RL update with every row whole {t_whole:.2f} s vs each prompt once "
        f"{t['rl']:.2f} s -> {t_whole / t['rl']:.2f}x", flush=True)
  print(f"[teacher scoring] batched {scoring['batched_s'] * 1e3:.0f} ms "
        f"({scoring['teacher_forward_rows_batched']} rows scored for {scoring['cross_rows']} "
        f"cross rows) vs per-pair loop {scoring['loop_s'] * 1e3:.0f} ms -> "
        f"{scoring['speedup']:.2f}x", flush=True)

  opd_total = sum(opd_t.values())
  split = {"sampling": opd_t["time/sample_s"] / opd_total,
           "verification": opd_t["time/verify_s"] / opd_total,
           "teacher_scoring": min(scoring["batched_s"], opd_t["time/update_s"]) / opd_total}
  split["update"] = 1.0 - sum(split.values())
  rl_total = sum(rl_t.values())
  rl_split = {"sampling": rl_t["time/sample_s"] / rl_total,
              "verification": rl_t["time/verify_s"] / rl_total,
              "update": rl_t["time/update_s"] / rl_total}
  n_prompts = s * b.stage.native_prompts
  # Sampling is one forward; the update a forward and a backward (3x a forward).
  flops = 4.0 * forward_flops(mc, n_prompts, g, p_len, r_len)
  rl_rate = flops / rl_total
  print(f"[RL step] {rl_total:.2f} s (sampling {rl_t['time/sample_s']:.2f}, verification "
        f"{rl_t['time/verify_s']:.2f}, update {rl_t['time/update_s']:.2f}): "
        f"{flops / 1e9:.0f} GFLOP useful -> {rl_rate / 1e9:.0f} GFLOP/s = "
        f"{rl_rate / peak:.2f} of the dot peak", flush=True)
  print(f"[OPD step] {opd_total:.2f} s; shares {json.dumps({k: round(v, 3) for k, v in split.items()})}",
        flush=True)
  out = {
      "bench": "copd_step", "quick": args.quick, "dtype": args.dtype, "cpu": cpu_name(),
      "shape": {"branches": s, "native_prompts": b.stage.native_prompts,
                "cross_prompts": b.stage.cross_prompts, "samples": g, "prompt_len": p_len,
                "response_len": r_len},
      "scoring_batched_vs_loop": round(scoring["speedup"], 3),
      "opd_step_over_rl_step": round(opd_over_rl, 3),
      "opd_update_over_rl_update": round(t["opd"] / t["rl"], 3),
      "prompt_once_update_speedup": round(t_whole / t["rl"], 3),
      "topk_opd_step_over_sampled_token_step": round(topk_over_sampled, 3),
      "topk_opd_update_over_sampled_token_update": round(t["topk_opd"] / t["opd"], 3),
      "tis_applied": tis_applied,
      "tis_weight_mean": round(float(np.mean(tis_metrics.get("tis/weight_mean", np.nan))), 4),
      "step_time_split": {k: round(v, 3) for k, v in split.items()},
      "rl_step_time_split": {k: round(v, 3) for k, v in rl_split.items()},
      "step_flops_per_s_over_dot_peak": round(rl_rate / peak, 3),
      "dot_peak_gflops": round(peak / 1e9, 1),
      "rl_step_s": round(rl_total, 3), "opd_step_s": round(opd_total, 3),
      "rl_step_useful_gflop": round(flops / 1e9, 1),
      "teacher_forward_rows": scoring["teacher_forward_rows_batched"],
      "cross_rows": scoring["cross_rows"],
      "teacher_useful_rows_fraction": {k: round(v["fraction"], 3)
                                       for k, v in fractions["one_device"].items()},
      "teacher_useful_rows_fraction_expert_mesh": {
          k: round(v["fraction"], 3) for k, v in fractions["expert_mesh"].items()},
      "compiles_per_stage": max(compiles.values()),
      "update_compiles": compiles,
      "peak_rss_gib": round(peak_rss_gib(), 2),
  }
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
