"""Verifier benchmark: correctness on labelled symbolic answers, throughput of the
verifier worker pool.

    python experiments/bench_verify.py [--quick] [--workers N]

Prints readable lines, then ONE JSON object as the last line:
  symbolic_equivalence_accuracy  fraction of the labelled symbolic pairs (equivalent and
                                 not, written out by hand below) the math verifier gets
                                 right; must be 1.0
  math_answers_per_s             1,000 mixed answers (symbolic, numeric, fractions, sets,
                                 intervals, answer phrases, choice, exact, integer) scored
                                 with the default reward config (config.reward)
  responses_per_s_1_worker       the same answers through a pool of 1 worker process
  responses_per_s_pool           ... through a pool of --workers processes (default: the
                                 CPU count)
  pool_speedup                   responses_per_s_pool / responses_per_s_1_worker
  worker_startup_s               one worker's start (spawn, imports, warm-up)
  plugin_wait_*                  the same comparison for a reward plug-in that waits 10 ms
                                 and uses no CPU (the pool's own overhead and scaling)
  load_average_1min              the machine's load when the run ended (the pool cannot
                                 beat 1 worker when other processes hold the cores)

Pools are started and warmed before timing; each timing is the median of interleaved
repeats (1 worker, pool, 1 worker, ...), because the machine is shared and noisy. Every
timed run scores its own fresh set of distinct answers: a repeated set would be served
from the workers' parse cache and sympy's cache, favouring whichever worker saw it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from copd_jax.data import examples as tasks, math_verifier as verifiers, verifiers as verifiers_lib

# (response, reference, equivalent?) -- checked by hand.
SYMBOLIC_LABELLED = [
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{x(x+3)}", "x^2+3x", True),
    ("\\boxed{\\sin^2x+\\cos^2x}", "1", True),
    ("\\boxed{\\frac{x^2-1}{x-1}}", "x+1", True),
    ("\\boxed{2\\sin x\\cos x}", "\\sin 2x", True),
    ("\\boxed{(a+b)(a-b)}", "a^2-b^2", True),
    ("\\boxed{\\frac{1}{x}+\\frac{1}{y}}", "\\frac{x+y}{xy}", True),
    ("\\boxed{e^{2\\ln x}}", "x^2", True),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("\\boxed{\\log_2 8}", "3", True),
    ("The answer is $x^3-1$.", "(x-1)(x^2+x+1)", True),
    ("The answer is: \\frac{2x}{4}", "\\frac{x}{2}", True),
    ("\\boxed{\\{2,1,3\\}}", "\\{1,2,3\\}", True),
    ("\\boxed{(0,1]}", "(0,1]", True),
    ("\\boxed{x^2+2x}", "(x+1)^2", False),
    ("\\boxed{x(x-3)}", "x^2+3x", False),
    ("\\boxed{\\sin^2x-\\cos^2x}", "1", False),
    ("\\boxed{(a+b)^2}", "a^2+b^2", False),
    ("\\boxed{\\frac{1}{x+y}}", "\\frac{1}{x}+\\frac{1}{y}", False),
    ("\\boxed{\\sqrt{x^2}}", "x^2", False),
    ("\\boxed{2x}", "x^2", False),
    ("\\boxed{(0,1)}", "(0,1]", False),
    ("The answer is $x^3+1$.", "(x-1)(x^2+x+1)", False),
    ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}", False),
]


# Ten kinds of answer, k -> (response, reference answer, verifier): math equivalences the
# symbolic checker must see through, then a choice, an exact string and an integer.
ANSWER_KINDS = (
    lambda k: (f"\\boxed{{x^2+{2 * k}x+{k * k}}}", f"(x+{k})^2", "math"),
    lambda k: (f"\\boxed{{x(x+{k})}}", f"x^2+{k}x", "math"),
    lambda k: (f"The answer is {k / 4}.", f"\\frac{{{k}}}{{4}}", "math"),
    lambda k: (f"\\boxed{{\\frac{{{k}}}{{{k + 1}}}}}", f"\\frac{{{2 * k}}}{{{2 * k + 2}}}", "math"),
    lambda k: (f"\\boxed{{{k}\\sqrt{{2}}}}", f"\\sqrt{{{2 * k * k}}}", "math"),
    lambda k: (f"\\boxed{{\\{{{k}, {k + 1}\\}}}}", f"\\{{{k + 1}, {k}\\}}", "math"),
    lambda k: (f"Answer: ({k}, {k + 2}]", f"({k},{k + 2}]", "math"),
    lambda k: (f"The answer is ({'ABCD'[k % 4]}).", "ABCD"[k % 4], "choice"),
    lambda k: (f"the final answer is city{k}", f"City{k}", "exact"),
    lambda k: (f"{k}+0={k}#{k % 1000}", str(k % 1000), "integer"),
)


def mixed_answers(n: int, first: int = 0) -> tuple[list[str], list[tasks.Example]]:
  """n distinct (response, example) pairs cycling through ten kinds of answer; sets with
  different `first` share no answer (so no worker or sympy cache serves a timed run)."""
  cases = [ANSWER_KINDS[k % 10](k) for k in range(first + 1, first + 1 + n)]
  examples = [tasks.Example("math" if verifier == "math" else "bench", "q", answer,
                            verifier=verifier, modality="text")
              for _, answer, verifier in cases]
  return [response for response, _, _ in cases], examples


def wait_reward(response, example):
  """A reward plug-in that waits 10 ms (like a call to an external judge) and uses no
  CPU: what the pool gains when the cores are not the limit."""
  time.sleep(0.01)
  return 1.0


def plugin_throughput(workers: int, n: int = 300) -> float:
  """Responses per second of the `wait_reward` plug-in through `workers` processes."""
  config = verifiers_lib.RewardConfig(fn="bench_verify:wait_reward", workers=workers)
  examples = [tasks.Example("bench", "q", str(i), verifier="exact", modality="text")
              for i in range(n)]
  verifiers_lib.rewards_for(["warm"] * workers, examples[:workers], config)  # start, warm
  start = time.perf_counter()
  verifiers_lib.rewards_for([str(i) for i in range(n)], examples, config)
  return n / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="fewer repeats")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
  parser.add_argument("--answers", type=int, default=1000)
  args = parser.parse_args()
  repeats = 3 if args.quick else 5

  default = verifiers_lib.RewardConfig()
  one = verifiers_lib.RewardConfig(workers=1)
  pool = verifiers_lib.RewardConfig(workers=args.workers)

  # Correctness first (also starts and warms the default pool).
  start = time.perf_counter()
  verifiers_lib.rewards_for(["\\boxed{1}"], [tasks.Example("math", "q", "1", verifier="math",
                                                       modality="text")], one)
  startup = time.perf_counter() - start
  responses = [r for r, _, _ in SYMBOLIC_LABELLED]
  examples = [tasks.Example("math", "q", a, verifier="math", modality="text")
              for _, a, _ in SYMBOLIC_LABELLED]
  labels = np.array([float(y) for _, _, y in SYMBOLIC_LABELLED], np.float32)
  got = verifiers_lib.rewards_for(responses, examples, default)
  accuracy = float(np.mean(got == labels))
  for (response, answer, label), value in zip(SYMBOLIC_LABELLED, got):
    if value != label:
      print(f"WRONG: {response!r} vs {answer!r}: got {value}, label {label}")
  print(f"symbolic equivalence accuracy {accuracy:.3f} on {len(labels)} labelled pairs")

  responses, examples = mixed_answers(args.answers)
  kinds = {}
  for ex in examples:
    kinds[ex.verifier] = kinds.get(ex.verifier, 0) + 1
  print(f"{len(responses)} mixed answers per timed run: {kinds}")

  # Our own pools (shared_pool keeps one), warmed, then timed interleaved.
  pools = {name: verifiers.VerifierPool(cfg.workers) for name, cfg in
           (("one", one), ("pool", pool), ("default", default))}
  warm_responses, warm_examples = mixed_answers(50, first=10**6)
  for p in pools.values():
    p.run([r for r in (verifiers.math_request(x, ex.answer) for x, ex in
                       zip(warm_responses, warm_examples) if ex.verifier == "math") if r],
          timeout_s=30)  # start and warm every worker

  def score_with(name, first):
    """Scores a fresh set the way verifiers_lib.score does (cheap verifiers here, math in
    the pool); returns the math results."""
    rs, exs = mixed_answers(args.answers, first)
    for r, ex in zip(rs, exs):
      if ex.verifier != "math":
        verifiers_lib.reward_for(r, ex.answer, ex.verifier)
    requests = [verifiers.math_request(r, ex.answer) for r, ex in zip(rs, exs)
                if ex.verifier == "math"]
    results, stats = pools[name].run([q for q in requests if q], timeout_s=default.timeout_s)
    assert stats.timeouts == 0 and stats.over_budget == 0, stats
    return results

  times = {"one": [], "pool": [], "default": []}
  mixed_correct = []
  for r in range(repeats):
    for i, name in enumerate(times):
      first = (r * len(times) + i) * 10 * args.answers
      start = time.perf_counter()
      mixed_correct += score_with(name, first)
      times[name].append(time.perf_counter() - start)
  mixed_correct = float(np.mean(mixed_correct))  # every math answer in the mixed sets is right
  per_s = {name: len(responses) / statistics.median(t) for name, t in times.items()}
  for p in pools.values():
    p.stop()
  print(f"math answers correct in the mixed sets: {mixed_correct:.3f}")
  print(f"1 worker: {per_s['one']:.0f} answers/s; {args.workers} workers: "
        f"{per_s['pool']:.0f} answers/s; default config ({default.workers} workers): "
        f"{per_s['default']:.0f} answers/s; worker startup {startup:.1f} s")
  wait_one, wait_pool = plugin_throughput(1), plugin_throughput(args.workers)
  verifiers_lib.shared_pool(default).stop()
  print(f"10 ms waiting plug-in: 1 worker {wait_one:.0f}/s, {args.workers} workers "
        f"{wait_pool:.0f}/s")
  print(json.dumps({
      "quick": args.quick, "answers": len(responses), "workers": args.workers,
      "symbolic_equivalence_accuracy": accuracy,
      "symbolic_pairs": len(labels),
      "mixed_math_correct": round(mixed_correct, 4),
      "math_answers_per_s": round(per_s["default"], 1),
      "responses_per_s_1_worker": round(per_s["one"], 1),
      "responses_per_s_pool": round(per_s["pool"], 1),
      "pool_speedup": round(per_s["pool"] / per_s["one"], 3),
      "worker_startup_s": round(startup, 2),
      "plugin_wait_responses_per_s_1_worker": round(wait_one, 1),
      "plugin_wait_responses_per_s_pool": round(wait_pool, 1),
      "plugin_wait_pool_speedup": round(wait_pool / wait_one, 3),
      "cpu_count": os.cpu_count(),
      "load_average_1min": round(os.getloadavg()[0], 2),
  }))


if __name__ == "__main__":
  main()
