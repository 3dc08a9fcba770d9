"""Chat-template render cost: the render worker (a reused process, killed at the
deadline) against rendering in-process, on the committed Qwen3 tokenizer's template.

    python experiments/bench_chat_template.py [--calls N]

Prints readable lines, then ONE JSON object as the last line:
  inprocess_plain_us      per render, plain ImmutableSandboxedEnvironment (transformers'
                          settings, no limits), template compiled once
  inprocess_limited_us    per render, our limited sandbox in this process (the size and
                          time checks, no worker)
  worker_us               per render through HFTokenizer.render_chat (the worker: pickle
                          the variables, pipe round trip, render with the checks)
  worker_overhead_us      worker_us - inprocess_limited_us: what the worker adds per call
  worker_vs_limited       worker_us / inprocess_limited_us
  limited_vs_plain        inprocess_limited_us / inprocess_plain_us (the checks' cost)
  prompt_token_ids_us     per prompt_token_ids call (render + tokenize), for scale
  worker_start_s          one cold start of the worker (spawn, imports, first render)
  load_average_1min       the machine's load when the run ended
Each timing is the median of 7 interleaved repeats of --calls calls (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jinja2.ext
import jinja2.sandbox

from copd_jax.data import chat_template, chat_template_worker, hf_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO, "tests", "fixtures", "hf", "qwen3_tiny", "tokenizer")
MESSAGES = [{"role": "system", "content": "You are a careful mathematician."},
            {"role": "user", "content": "What is the sum of the first 100 positive integers? "
                                        "Put the final answer in \\boxed{}."}]


def per_call_us(fn, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    fn()
  return (time.perf_counter() - start) / calls * 1e6


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--calls", type=int, default=300)
  args = parser.parse_args()

  tok = hf_tokenizer.HFTokenizer(TOKENIZER_DIR)
  source = tok._template_source
  variables = {k: v for k, v in tok._special_token_text.items() if v is not None}
  variables.update(messages=MESSAGES, add_generation_prompt=True)

  plain_env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  plain_env.filters["tojson"] = lambda v, **kw: json.dumps(v, **kw)
  plain = plain_env.from_string(source)
  limited_env = chat_template.chat_template_environment()
  limited = chat_template.compile_chat_template(limited_env, source)

  chat_template_worker._RENDER_WORKER.close()
  start = time.perf_counter()
  worker_text = tok.render_chat(MESSAGES)
  worker_start_s = time.perf_counter() - start
  expected = plain.render(**variables)
  assert worker_text == expected == chat_template.render_in_sandbox(limited_env, limited,
                                                                    variables)

  runs = {"plain": [], "limited": [], "worker": [], "prompt": []}
  for _ in range(7):
    runs["plain"].append(per_call_us(lambda: plain.render(**variables), args.calls))
    runs["limited"].append(per_call_us(
        lambda: chat_template.render_in_sandbox(limited_env, limited, variables), args.calls))
    runs["worker"].append(per_call_us(lambda: tok.render_chat(MESSAGES), args.calls))
    runs["prompt"].append(per_call_us(lambda: tok.prompt_token_ids(MESSAGES[1]["content"]),
                                      args.calls))
  median = {k: statistics.median(v) for k, v in runs.items()}
  for name, value in median.items():
    print(f"{name:>8}: {value:9.1f} us per call")
  print(f"worker cold start: {worker_start_s:.3f} s")
  print(json.dumps({
      "calls": args.calls,
      "inprocess_plain_us": round(median["plain"], 1),
      "inprocess_limited_us": round(median["limited"], 1),
      "worker_us": round(median["worker"], 1),
      "worker_overhead_us": round(median["worker"] - median["limited"], 1),
      "worker_vs_limited": round(median["worker"] / median["limited"], 3),
      "limited_vs_plain": round(median["limited"] / median["plain"], 3),
      "prompt_token_ids_us": round(median["prompt"], 1),
      "worker_start_s": round(worker_start_s, 3),
      "cpu_count": os.cpu_count(),
      "load_average_1min": round(os.getloadavg()[0], 2),
  }))


if __name__ == "__main__":
  main()
