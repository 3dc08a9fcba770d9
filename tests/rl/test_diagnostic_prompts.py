"""The branch diagnostics measure on FIXED prompts: the same items (and sampling keys) at
every diagnostic step and in every run, whatever cfg.seed; each branch's answers there are
judged right / flawed-procedure (toy_flaws) and logged beside overlap and symmetric KL."""
import json

import jax
import pytest

from copd_jax import config_lib, default_config, policy_setup
from copd_jax.models import decoder as model_lib
from copd_jax.rl import diagnostics, loop, methods
from copd_jax.run_log import MetricsWriter


@pytest.fixture(scope="module")
def base():
  cfg = default_config.get("copd", "micro")
  s = policy_setup.build_setup(config_lib.spec_of(cfg))
  return s, model_lib.init_params(s.model_cfg, jax.random.key(0))


def run_copd(tmp_path, base, seed, monkeypatch):
  """A 2-step micro CoPD run with diagnostics after every step; returns
  (calls: [(step, [[question, ...] per branch], [[response, ...] per branch])], records)."""
  cfg = default_config.get("copd", "micro")
  cfg.seed = seed
  cfg.workdir = str(tmp_path / f"copd{seed}")
  cfg.rl.update(dict(diagnostics_every=1, diagnostic_prompts=4))
  config_lib.validate_config(cfg)
  calls, per_branch = [], []
  real = diagnostics.answer_rates

  def recording(examples, responses):  # called once per branch, in branch order
    per_branch.append(([ex.question + "=" + ex.answer for ex in examples], list(responses)))
    return real(examples, responses)

  monkeypatch.setattr(diagnostics, "answer_rates", recording)
  s, params = base
  writer = MetricsWriter(cfg.workdir)
  try:
    methods.run_rl_method(config_lib.spec_of(cfg), s, params, writer)
  finally:
    writer.close()
  branches = len(cfg.rl.capabilities)
  assert len(per_branch) % branches == 0
  for k in range(0, len(per_branch), branches):
    group = per_branch[k:k + branches]
    calls.append(([q for q, _ in group], [r for _, r in group]))
  with open(tmp_path / f"copd{seed}" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  return calls, records


def test_same_prompts_at_every_step_and_in_every_run(tmp_path, base, monkeypatch):
  calls0, records0 = run_copd(tmp_path, base, 0, monkeypatch)
  calls1, _ = run_copd(tmp_path, base, 1, monkeypatch)
  assert len(calls0) == 3 and len(calls1) == 3  # before training, after steps 1 and 2
  prompts = calls0[0][0]
  assert all(len(p) == 4 for p in prompts)
  # Each branch its own domain's items (text, image, video questions differ).
  assert len({tuple(p) for p in prompts}) == 3
  for questions, _ in calls0 + calls1:  # every step, both seeds: the same items
    assert questions == prompts
  # The same base policy and the same sampling keys: the same answers before training,
  # whatever the run's seed (common random numbers).
  assert calls0[0][1] == calls1[0][1]
  diag_steps = [r for r in records0 if "eval/overlap/with_base_mean" in r]
  assert len(diag_steps) == 3
  for r in diag_steps:
    for branch in ("text", "image", "video"):
      assert 0.0 <= r[f"eval/correct_rate/{branch}"] <= 1.0
    assert "eval/sym_kl/with_base_mean" in r and "eval/correct_rate/branches_mean" in r


def test_fixed_prompts_do_not_depend_on_the_other_branches(base):
  s, _ = base
  cfg = default_config.get("copd", "micro")

  def draw(seed, caps, n, rng):
    from copd_jax.rl import rollout as rollout_lib
    return rollout_lib.draw_examples(loop.data_context_at(cfg, s, seed), caps, n, rng)

  def questions(domains):
    return [[ex.question for ex in exs] for exs in diagnostics.fixed_prompts(7, domains, 5, draw)]

  forward = questions([("text",), ("image",), ("text", "image", "video")])
  backward = questions([("text", "image", "video"), ("image",)])
  assert forward[1] == backward[1] and forward[2] == backward[0]
  assert questions([("text",)])[0] == forward[0]
  assert questions([("text",)])[0] != [ex.question for ex in diagnostics.fixed_prompts(
      8, [("text",)], 5, draw)[0]]  # another task seed: other items
