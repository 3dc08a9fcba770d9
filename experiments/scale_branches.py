"""How CoPD scales from 3 to 12 branches (issue 28): does the merged model keep up with
the experts as N grows, and which teacher topology keeps the cost affordable?

    python experiments/scale_branches.py [--seeds 0,1,2] [--arms full_ft[,lora]]
        [--ns 3,6,12] [--topologies hub,full,ring] [--report_only] [--quick]

Capabilities: the first N of the toy suite's twelve families (copd_jax/data/toy_tasks.py,
FAMILY_NAMES: text, image, video, then nine text families), each with its own flawed
procedure in the base's demonstrations. One base is SFT'd on all twelve (STUDY_FIELDS)
and serves every N, seed and arm. Per seed, arm and N this runs
  - experts: N independent branches, one per capability (method `experts`);
  - CoPD with each topology (rl.opd.topology): hub (the first capability teaches and
    learns from every other), full mesh (every ordered pair), ring (each branch with its
    two neighbours). Where two topologies give the same teacher matrix (hub = full =
    ring at N = 2; full = ring at N = 3) the run is shared, not repeated.
Arms: full fine-tuning, and LoRA branches on the frozen base (model.lora.rank = LORA_RANK;
needs the LoRA branches of copd_jax.models).

Per configuration (N, topology, arm) the report gives
  - merged_minus_experts_points: merged CoPD's accuracy on each capability minus that
    capability's expert on it, paired on the same held-out items and seeds, as
    [mean, low, high] in points; the interval is experiments/stats.py's (seed-level t
    interval over per-seed means with the items' variance added; with one seed only the
    items' t interval, which ignores seed noise: the report says how many seeds ran);
    per capability too;
  - step_seconds: the median wall time of a CoPD OPD step (sampling + verification +
    update, the first OPD step left out: it compiles), from the run's metrics, mean over
    seeds; step_seconds_per_branch = that / N; the fitted exponent k of step_seconds ~ N^k
    per topology (`growth`, least squares in log-log);
  - teacher forward rows per OPD step (each teacher scores the rows it received,
    compacted to its real prompts; host arithmetic) and their fitted exponent in N; with `--preset toy`
    also XLA's compiled memory (arguments + outputs + temporaries) of the OPD update
    program at the study's shapes, measured here (not for the micro preset);
  - 4B-scale memory: bytes of N branches' parameters plus AdamW state (f32) of
    Qwen3-VL-4B (configs/pod_4b.py's architecture), from jax.eval_shape (nothing
    allocated). This is NOT a deviceless TPU compile (those take minutes each, too many
    for this study's budget): it leaves out activations and the teacher-scoring rows, so
    it does not depend on the topology.

Resumable like experiments/reproduce.py (same run directories, same checks): a finished
run is read, a killed run resumes from its checkpoints, and the report
(<out>/scale_branches.json, scale_branches.md) is rewritten after every run. Runs go seed
by seed (every N and topology of seed 0 first), so a partial study has whole seeds.
`--quick`: the micro model, N = 2 and 3, 2 RL steps, 4 held-out items (a test runs it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402  (config building, run_or_load, per-item rewards)

import stats  # noqa: E402  (experiments/stats.py)

from copd_jax.data import toy_tasks  # noqa: E402
from copd_jax.rl import schedules  # noqa: E402

FAMILIES = toy_tasks.FAMILY_NAMES
N_BRANCHES = (3, 6, 12)
TOPOLOGIES = ("hub", "full", "ring")
ARMS = ("full_ft", "lora")
LORA_RANK = 16
QUICK_NS = (2, 3)
# The study's model: the `micro` preset (a 1-layer decoder of width 32, f32, the toy
# suite's tokenizer and a 1-block vision tower), not the 4-layer toy model: on the 2-core
# machine shared by several agents the study got 5-10% of the CPU, at which the toy
# model's base alone took over an hour. `--preset toy` runs the same study on the toy model.
PRESET = "micro"
# All twelve families at difficulty 1; half of each family's demonstrations flawed (the
# base samples the right procedure often enough for a few RL steps to find it).
TASK_FIELDS = dict(
    tasks__capabilities=FAMILIES, tasks__difficulty={c: 1 for c in FAMILIES},
    warm_start__mix={c: 1.0 for c in FAMILIES},
    warm_start__flaw_rate={c: 0.5 for c in FAMILIES})
# Base: 600 SFT steps x 48 demonstrations (2,400 per family). RL: 10 steps per branch
# (OPD on steps 3, 4, 8, 9 of the paper's 3 : 2 cycle), 8 native prompts x 4 samples, and
# 11 cross prompts per branch on OPD steps, so that at N = 12 every student's cross
# prompts reach every one of its teachers (prompts go round-robin over a student's
# teachers, the same teacher per slot every step).
STUDY_FIELDS = dict(
    TASK_FIELDS, warm_start__steps=600, warm_start__batch_size=48, warm_start__warmup_steps=50,
    warm_start__log_every=100,
    rl__steps=10, rl__native_prompts=8, rl__samples_per_prompt=4, rl__cross_prompts=11,
    rl__opd__schedule__s_rl=3, rl__opd__schedule__s_opd=2,
    rl__eval_every=1000, rl__eval_examples=4, rl__diagnostics_every=1000,
    rl__diagnostic_prompts=2, checkpoint__every_steps=5, log__completions=0)
QUICK_FIELDS = dict(
    TASK_FIELDS, rl__steps=2, rl__eval_every=1000, rl__diagnostics_every=1000, log__completions=0)


# ------------------------------------------------------------------------------ runs

def capabilities(n: int) -> tuple[str, ...]:
  if not 2 <= n <= len(FAMILIES):
    raise ValueError(f"N must be in [2, {len(FAMILIES)}], got {n}")
  return FAMILIES[:n]


def topology_run(n: int, topology: str, topologies=TOPOLOGIES) -> str:
  """The topology whose run serves `topology` at N branches: the first of `topologies`
  with the same teacher matrix (hub's hub = the first capability)."""
  matrix = schedules.topology_matrix(n, topology, hub=0)
  for other in topologies:
    if np.array_equal(schedules.topology_matrix(n, other, hub=0), matrix):
      return other
  return topology


def fields_of(args, method: str = "copd") -> dict:
  return QUICK_FIELDS if args.quick else STUDY_FIELDS


def study_config(method: str, seed: int, workdir: str, args, *, n: int = 0,
                 topology: str = "hub", arm: str = "full_ft"):
  """reproduce.make_config with the study's fields, N capabilities, topology and arm."""
  fields = dict(fields_of(args, method))
  if method != "base":
    caps = capabilities(n)
    fields.update(rl__capabilities=caps, num_experts=n, rl__opd__hub=caps[0],
                  rl__opd__topology=topology)
  else:
    fields.update(rl__capabilities=FAMILIES, num_experts=1, rl__opd__hub=FAMILIES[0])
  if arm == "lora":
    fields["model__lora__rank"] = args.lora_rank
  return make_config(method, seed, workdir, args, **fields)


def make_config(method: str, seed: int, workdir: str, args, **overrides):
  """reproduce.make_config at the study's preset (args.preset; micro with --quick)."""
  cfg = reproduce.default_config.get(method, "micro" if args.quick else args.preset)
  cfg.seed, cfg.workdir = seed, workdir
  cfg.warm_start.checkpoint_dir = args.base_dir
  cfg.eval.num_examples = args.eval_examples
  for item in args.set:  # --set field=value: the recipe, every run
    reproduce.default_config.set_field(cfg, *reproduce.parse_setting(item))
  for field, value in overrides.items():  # keyword `a__b` sets config field a.b
    reproduce.default_config.set_field(cfg, field.replace("__", "."), value)
  return cfg


def base_config(args):
  return study_config("base", 0, os.path.join(args.runs, "base"), args)


def run_dir_of(args, arm: str, seed: int, n: int, name: str) -> str:
  return os.path.join(args.runs, arm, f"seed{seed}", f"n{n}", name)


def run_order(args):
  """(arm, seed, n, name, method, topology) in run order: arm by arm, seed by seed, N
  ascending; per N the experts, then each distinct topology's CoPD run."""
  for arm in args.arms:
    for seed in args.seeds:
      for n in args.ns:
        yield arm, seed, n, "experts", "experts", "hub"
        for topology in args.topologies:
          if topology_run(n, topology, args.topologies) == topology:
            yield arm, seed, n, f"copd_{topology}", "copd", topology


# ------------------------------------------------------------------- cost measurements

def update_cost(n: int, topology: str, native: int, cross: int, samples: int) -> dict:
  """The OPD update program at the study's shapes (toy model, N branches): XLA's compiled
  memory (arguments + outputs + temporaries, this CPU) and the teacher forward rows."""
  import dataclasses

  import bench_branches  # experiments/bench_branches.py: the toy problem of N branches
  from copd_jax import policy_setup, sharding
  from copd_jax.analysis import abstract_step
  from copd_jax.rl import scoring, update as update_lib
  params, opt_state, rows, routing, ucfg, optimizer, start, p = bench_branches.toy_problem(
      n, topology, native, cross, g=samples)
  run = sharding.RunSharding.one_device(policy_setup.declared_param_axes(ucfg.model))
  compiled = update_lib.update_program(update_lib.UpdateFn(run, ucfg, optimizer)).lower(
      update_lib.TrainState(params, opt_state), dataclasses.replace(rows, prompt_len=p),
      scoring.Teachers(params, routing.as_arrays(), start), None).compile()
  memory = abstract_step.compiled_memory_bytes(compiled)
  return {"update_memory_bytes": int(memory["total_bytes"]),
          "update_temp_bytes": int(memory["temp_bytes"]),
          "teacher_forward_rows": int(routing.teacher_forward_rows()),
          "cross_rows": int(routing.send_valid.sum())}


def teacher_rows(n: int, topology: str, cross: int, samples: int) -> dict:
  """Rows the OPD update's teacher forward scores per step on one device (each teacher
  compacts the rows it received to its real prompts: stages.teacher_routing) and the cross rows
  that carry a teacher's score, for N branches (host arithmetic, nothing compiled)."""
  from copd_jax.rl import stages
  stage = stages.Stage(
      name="scale", steps=1, student_data=tuple((c,) for c in capabilities(n)),
      teacher_data=tuple((c,) for c in capabilities(n)), live_teachers=True,
      topology=schedules.topology_matrix(n, topology, hub=0),
      branch_beta=np.ones(n, np.float32), schedule=schedules.OPDSchedule(kind="cycle"),
      native_prompts=1, cross_prompts=cross, samples_per_prompt=samples)
  routing = stages.teacher_routing(stages.cross_teacher_assignment(stage), n, samples)
  return {"teacher_forward_rows": int(routing.teacher_forward_rows()),
          "cross_rows": int(routing.send_valid.sum())}


def pod_4b_bytes(n: int, lora_rank: int = 0) -> dict:
  """Bytes of N branches' f32 parameters + AdamW state at Qwen3-VL-4B's shape
  (configs/pod_4b.py), from jax.eval_shape (experiments/bench_branches.lora_memory_4b):
  N full copies, or with lora_rank > 0 the frozen base once plus N rank-r adapters."""
  import bench_branches
  figures = bench_branches.lora_memory_4b(n, lora_rank or LORA_RANK)
  if not lora_rank:
    return {"bytes": figures["full_branches_bytes"],
            "how": "jax.eval_shape: N x (params + AdamW state), f32; no activations"}
  return {"bytes": figures["lora_branches_bytes"],
          "how": f"jax.eval_shape: base + N x rank-{lora_rank} adapters (params + AdamW "
                 "state), f32; no activations"}


# ------------------------------------------------------------------------- the report

def opd_step_seconds(metrics_path: str) -> float | None:
  """Median wall time of the OPD steps of a run (sample + verify + update seconds on steps
  whose opd_weight > 0), the first OPD step left out (it compiles the distilling update);
  None when fewer than one remains."""
  times = []
  for record in reproduce.read_jsonl(metrics_path):
    if record.get("train/opd_weight", 0) > 0 and "train/time/update_s" in record:
      times.append(sum(record.get(f"train/time/{k}_s", 0.0)
                       for k in ("sample", "verify", "update")))
  times = times[1:]
  return float(np.median(times)) if times else None


def merged_minus_experts(merged: dict, experts: dict, caps) -> dict:
  """merged CoPD minus each capability's own expert, paired on items and seeds.

  merged: {cap: f[S, I]} (the merged model on cap); experts: {cap: f[S, I]} (cap's
  expert on cap). -> {'points': [mean, low, high] over every capability's items,
  'per_capability': {cap: [mean, low, high]}} in points (95%, experiments/stats.py)."""
  def triple(a, b):
    mean, (low, high) = stats.paired_difference_ci(a, b)
    return [round(100 * mean, 2), round(100 * low, 2), round(100 * high, 2)]
  return {"points": triple(reproduce.overall(merged, caps), reproduce.overall(experts, caps)),
          "per_capability": {c: triple(merged[c], experts[c]) for c in caps}}


def growth_exponent(ns, seconds) -> float | None:
  """k of seconds ~ a N^k: the least-squares slope of log seconds on log N (None with
  fewer than two points)."""
  pairs = [(n, s) for n, s in zip(ns, seconds) if s is not None and s > 0]
  if len(pairs) < 2:
    return None
  x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
  return round(float(np.polyfit(x, y, 1)[0]), 3)


def _done(workdir: str) -> bool:
  return all(os.path.exists(os.path.join(workdir, f)) for f in ("summary.json", "eval_rewards.npz"))


def configuration_report(args, arm: str, n: int, topology: str, costs: dict) -> dict:
  caps = capabilities(n)
  name = f"copd_{topology_run(n, topology, args.topologies)}"
  seeds, merged, experts, step_s = [], {c: [] for c in caps}, {c: [] for c in caps}, []
  for seed in args.seeds:
    copd_dir = run_dir_of(args, arm, seed, n, name)
    experts_dir = run_dir_of(args, arm, seed, n, "experts")
    if not (_done(copd_dir) and _done(experts_dir)):
      continue
    copd_r, experts_r = reproduce.load_rewards(copd_dir), reproduce.load_rewards(experts_dir)
    seeds.append(seed)
    for c in caps:
      merged[c].append(copd_r[f"merged/{c}"])
      experts[c].append(experts_r[f"branch/{c}/{c}"])
    step_s.append(opd_step_seconds(os.path.join(copd_dir, "metrics.jsonl")))
  out = {"n": n, "topology": topology, "arm": arm, "run": name, "seeds": seeds,
         "capabilities": list(caps)}
  if seeds:
    merged = {c: np.stack(v) for c, v in merged.items()}
    experts = {c: np.stack(v) for c, v in experts.items()}
    gap = merged_minus_experts(merged, experts, caps)
    out["merged_minus_experts_points"] = gap["points"]
    out["merged_minus_experts_per_capability"] = gap["per_capability"]
    out["merged_accuracy_points"] = {c: round(100 * float(merged[c].mean()), 2) for c in caps}
    out["expert_accuracy_points"] = {c: round(100 * float(experts[c].mean()), 2) for c in caps}
    out["merged_accuracy_overall_points"] = round(float(np.mean(
        list(out["merged_accuracy_points"].values()))), 2)
    out["expert_accuracy_overall_points"] = round(float(np.mean(
        list(out["expert_accuracy_points"].values()))), 2)
    measured = [s for s in step_s if s is not None]
    out["step_seconds"] = round(float(np.mean(measured)), 3) if measured else None
    out["step_seconds_per_branch"] = (round(out["step_seconds"] / n, 3)
                                      if out["step_seconds"] is not None else None)
  fields = fields_of(args)
  out.update(teacher_rows(n, topology, fields.get("rl__cross_prompts", 2),
                          fields.get("rl__samples_per_prompt", 2)))
  out.update(costs.get(f"{arm}/n{n}/{topology}", {}))
  out.update(costs.get(f"{arm}/n{n}/pod_4b", {}))
  return out


def build_report(args, costs: dict, command: str, minutes: float) -> dict:
  configs = [configuration_report(args, arm, n, t, costs)
             for arm in args.arms for n in args.ns for t in args.topologies]

  def per(arm, key):
    return {str(n): {t: next((c.get(key) for c in configs
                              if (c["arm"], c["n"], c["topology"]) == (arm, n, t)), None)
                     for t in args.topologies} for n in args.ns}

  def growth(arm, key="step_seconds"):
    return {t: growth_exponent(args.ns, [per(arm, key)[str(n)][t] for n in args.ns])
            for t in args.topologies}

  arm0 = args.arms[0]
  report = {
      "command": command, "minutes_this_invocation": round(minutes, 1),
      "quick": bool(args.quick), "preset": "micro" if args.quick else args.preset,
      "n_branches": list(args.ns),
      "topologies": list(args.topologies), "arms": list(args.arms),
      "lora_rank": args.lora_rank if "lora" in args.arms else None,
      "capabilities_in_order": list(FAMILIES), "seeds_asked": list(args.seeds),
      "eval_examples_per_capability": args.eval_examples,
      "recipe": {k.replace("__", "."): v for k, v in fields_of(args).items()
                 if not k.startswith(("tasks__", "warm_start__mix", "warm_start__flaw"))},
      "interval": "95%, experiments/stats.py: " + stats.INTERVAL_METHOD
                  + "; with one seed, the items' t interval only",
      # The headline fields (arm = the first of `arms`); every arm under `by_arm`.
      "merged_minus_experts_points": per(arm0, "merged_minus_experts_points"),
      "seeds_finished": per(arm0, "seeds"),
      "step_seconds": per(arm0, "step_seconds"),
      "step_seconds_per_branch": per(arm0, "step_seconds_per_branch"),
      "growth": growth(arm0),
      "update_memory_bytes": per(arm0, "update_memory_bytes"),
      "teacher_forward_rows": per(arm0, "teacher_forward_rows"),
      "growth_teacher_forward_rows": growth(arm0, "teacher_forward_rows"),
      "pod_4b_bytes": {str(n): costs.get(f"{arm0}/n{n}/pod_4b", {}).get("pod_4b_bytes")
                       for n in args.ns},
      "by_arm": {arm: {"merged_minus_experts_points": per(arm, "merged_minus_experts_points"),
                       "step_seconds_per_branch": per(arm, "step_seconds_per_branch"),
                       "growth": growth(arm)} for arm in args.arms},
      "configurations": configs,
  }
  return report


def _cell(triple) -> str:
  return "—" if triple is None else f"{triple[0]:+.1f} [{triple[1]:+.1f}, {triple[2]:+.1f}]"


def _num(x, fmt="{:.2f}") -> str:
  return "—" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
  lines = [f"# CoPD from 3 to 12 branches\n\nMade by `{report['command']}` "
           f"(model: the `{report['preset']}` preset). "
           f"{report['eval_examples_per_capability']} held-out items per capability; "
           f"merged − experts: merged CoPD minus each capability's own expert, in points, "
           f"mean [95% interval] ({report['interval']}). Step: median OPD step on this "
           "machine (2 shared CPU cores), mean over seeds. Memory: the OPD update's "
           "compiled memory here; 4B: params + AdamW state of N branches (jax.eval_shape, "
           "not a TPU compile).\n"]
  for arm in report["arms"]:
    lines.append(f"## {arm}\n")
    lines.append("| N | topology | seeds | merged | experts | merged − experts | step s | "
                 "s per branch | update MiB | teacher rows | 4B GiB |")
    lines.append("|---" * 11 + "|")
    for c in report["configurations"]:
      if c["arm"] != arm:
        continue
      pod, memory = c.get("pod_4b_bytes"), c.get("update_memory_bytes")
      shared = "" if c["run"] == f"copd_{c['topology']}" else f" (= {c['run'][5:]})"
      lines.append(
          f"| {c['n']} | {c['topology']}{shared} | {c['seeds']} "
          f"| {_num(c.get('merged_accuracy_overall_points'), '{:.1f}')} "
          f"| {_num(c.get('expert_accuracy_overall_points'), '{:.1f}')} "
          f"| {_cell(c.get('merged_minus_experts_points'))} "
          f"| {_num(c.get('step_seconds'))} | {_num(c.get('step_seconds_per_branch'))} "
          f"| {_num(None if memory is None else memory / 2**20, '{:.0f}')} "
          f"| {_num(c.get('teacher_forward_rows'), '{}')} "
          f"| {_num(None if pod is None else pod / 2**30, '{:.0f}')} |")
    growth = report["by_arm"][arm]["growth"]
    lines.append("\nFitted exponent k of step time ~ N^k: "
                 + ", ".join(f"{t} {_num(k, '{:.2f}')}" for t, k in growth.items()) + "\n")
  rows = report["growth_teacher_forward_rows"]
  lines.append("Teacher forward rows per OPD step ~ N^k (each teacher scores the rows it "
               "received, compacted to its real prompts): " + ", ".join(f"{t} {_num(k, '{:.2f}')}" for t, k in rows.items())
               + "\n")
  return "\n".join(lines)


def write_report(args, costs, command: str, minutes: float) -> dict:
  report = build_report(args, costs, command, minutes)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "scale_branches.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(args.out, "scale_branches.md"), "w") as f:
    f.write(markdown(report))
  return report


# --------------------------------------------------------------------------- main

def _load_costs(path: str) -> dict:
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def measure_costs(args, costs: dict, path: str, arm: str, n: int) -> None:
  """The update memory of every topology at N and the 4B bytes, once (kept in `path`)."""
  fields = fields_of(args)
  native = fields.get("rl__native_prompts", 2)
  cross = fields.get("rl__cross_prompts", 2)
  samples = fields.get("rl__samples_per_prompt", 2)
  changed = False
  for topology in args.topologies:
    key = f"{arm}/n{n}/{topology}"
    if key not in costs and arm == "full_ft" and args.preset == "toy" and not args.quick:
      costs[key] = update_cost(n, topology, native, cross, samples)
      changed = True
  key = f"{arm}/n{n}/pod_4b"
  if key not in costs:
    figures = pod_4b_bytes(n, args.lora_rank if arm == "lora" else 0)
    costs[key] = {"pod_4b_bytes": figures["bytes"], "pod_4b_how": figures["how"]}
    changed = True
  if changed:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(costs, f, indent=1)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--ns", default=None, help="branch counts (default 3,6,12; quick: 2,3)")
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--arms", default="full_ft", help=f"comma-separated of {ARMS}")
  parser.add_argument("--lora_rank", type=int, default=LORA_RANK)
  parser.add_argument("--preset", default=PRESET, choices=("micro", "toy"),
                      help="the model of every run (default_config presets)")
  parser.add_argument("--quick", action="store_true",
                      help="micro model, N = 2 and 3, 2 steps, 4 items (a test runs it)")
  parser.add_argument("--runs", default=None)
  parser.add_argument("--out", default=None)
  parser.add_argument("--no_costs", action="store_true",
                      help="skip the update-memory compiles and 4B shapes")
  parser.add_argument("--costs_only", action="store_true",
                      help="measure the update memory and 4B shapes of every N; run nothing")
  reproduce.add_rerun_arguments(parser, "scale_branches.{json,md}")
  parser.set_defaults(eval_examples=None, base_dir=None)
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(",")]
  default_ns = QUICK_NS if args.quick else N_BRANCHES
  args.ns = [int(n) for n in (args.ns or ",".join(map(str, default_ns))).split(",")]
  args.topologies = [t for t in args.topologies.split(",") if t]
  args.arms = [a for a in args.arms.split(",") if a]
  for n in args.ns:
    capabilities(n)
  bad = ([t for t in args.topologies if t not in TOPOLOGIES]
         + [a for a in args.arms if a not in ARMS])
  if bad:
    raise SystemExit(f"unknown topologies / arms {bad}: use {TOPOLOGIES} / {ARMS}")
  default_root = "runs/scale_branches_quick" if args.quick else "experiments/results/scale_branches"
  args.out = args.out or (default_root if args.quick else "experiments/results")
  args.runs = args.runs or os.path.join(default_root, "runs" if args.preset == PRESET
                                        else f"runs_{args.preset}")
  args.base_dir = args.base_dir or os.path.join(args.runs, "base_policy")
  args.eval_examples = args.eval_examples or (4 if args.quick else 32)
  args.quick_steps = 0
  return args


def main(argv=None):
  args = parse_args(argv)
  command = reproduce.command_line("scale_branches.py", argv)
  costs_path = os.path.join(args.runs, "costs.json")
  costs = _load_costs(costs_path)
  start = time.perf_counter()
  if args.costs_only:
    for arm in args.arms:
      for n in args.ns:
        measure_costs(args, costs, costs_path, arm, n)
  elif not args.report_only:
    reproduce.run_or_load(base_config(args))
    for arm, seed, n, name, method, topology in run_order(args):
      workdir = run_dir_of(args, arm, seed, n, name)
      cfg = study_config(method, seed, workdir, args, n=n, topology=topology, arm=arm)
      reproduce.run_or_load(cfg)
      if not args.no_costs and method == "copd":
        measure_costs(args, costs, costs_path, arm, n)
      write_report(args, costs, command, (time.perf_counter() - start) / 60)
  report = write_report(args, costs, command, (time.perf_counter() - start) / 60)
  print(json.dumps({k: report[k] for k in ("n_branches", "topologies", "seeds_finished",
                                           "merged_minus_experts_points",
                                           "step_seconds_per_branch", "growth")}))
  return report


if __name__ == "__main__":
  main()
