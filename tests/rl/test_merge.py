"""The final merge where the trainer takes it: loop.merged_params (evaluation during a
CoPD stage), methods' final report, with branches that differ and a base that differs
from all of them. The merged model must be the (weighted) average of the branches written
in numpy here, not branch 0 and not an average that includes the base."""
import jax
from tiny_model import one_device_run
import numpy as np
import pytest

from copd_jax.config_lib import spec_of
from copd_jax import default_config, policy_setup
from copd_jax.models import decoder
from copd_jax.rl import evaluation, loop, methods, stages
from copd_jax.run_log import MetricsWriter

CAPS = ("text", "image", "video")


@pytest.fixture(scope="module")
def models():
  cfg = default_config.get("copd", "micro")
  cfg.log.completions = 0
  setup = policy_setup.build_setup(spec_of(cfg))
  base = decoder.init_params(setup.model_cfg, jax.random.key(0))
  # Every leaf of every branch moved its own way from the base (norm scales included).
  rng = np.random.default_rng(0)
  branches = jax.tree.map(
      lambda x: np.stack([np.asarray(x) + rng.normal(0, 0.1, x.shape).astype(np.float32)
                          for _ in CAPS]), base)
  return cfg, setup, base, branches


def numpy_average(branches, weights):
  """The leaves of sum_k w_k branch_k / sum_k w_k, in float64 numpy."""
  w = np.asarray(weights, np.float64) / np.sum(weights)
  return [np.tensordot(w, np.asarray(x, np.float64), axes=1) for x in jax.tree.leaves(branches)]


def assert_leaves_close(tree, want):
  got = jax.tree.leaves(tree)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


def test_branches_and_base_differ(models):
  """The premise of the tests below: any other merge gives other numbers."""
  _, _, base, branches = models
  for a, b in zip(jax.tree.leaves(branches), jax.tree.leaves(base)):
    assert np.abs(np.asarray(a[0]) - np.asarray(a[1])).max() > 1e-3
    assert np.abs(np.asarray(a).mean(0) - np.asarray(b)).max() > 1e-3


@pytest.mark.parametrize("merge_weights, weights", [({}, [1, 1, 1]),
                                                    ({"text": 1.0, "image": 3.0, "video": 0.0},
                                                     [1, 3, 0])])
def test_merged_params_is_the_weighted_branch_average(models, merge_weights, weights):
  cfg, _, _, branches = models
  cfg = cfg.copy_and_resolve_references()
  cfg.rl.merge_weights = merge_weights
  stage = stages.copd_stage(spec_of(cfg).rl, list(CAPS))
  assert_leaves_close(loop.merged_params(spec_of(cfg), stage, branches), numpy_average(branches, weights))


def fake_evaluate(recorded):
  """A stand-in for evaluation.evaluate_stacked that records the stacked params it is
  given and returns accuracies of the right shapes (nothing compiles)."""
  def evaluate(stacked_params, setup, eval_sets, *, responses_out=None, rewards_out=None,
               **kwargs):
    recorded.append(stacked_params)
    s = jax.tree.leaves(stacked_params)[0].shape[0]
    out = {}
    for cap, examples in eval_sets.items():
      out[f"accuracy/{cap}"] = np.zeros(s, np.float32)
      if responses_out is not None:
        responses_out[cap] = [[""] * len(examples) for _ in range(s)]
      if rewards_out is not None:
        rewards_out[cap] = np.zeros((s, len(examples)), np.float32)
      if kwargs.get("progress"):
        kwargs["progress"](cap)
    out["accuracy/overall"] = np.zeros(s, np.float32)
    return out
  return evaluate


def run_context(cfg, setup, base, tmp_path):
  writer = MetricsWriter(str(tmp_path))
  eval_sets = {c: e[:2] for c, e in policy_setup.held_out_sets(spec_of(cfg), setup).items()}
  return loop.RunContext(spec_of(cfg), setup, base, eval_sets, writer,
                         sharding=one_device_run(setup.model_cfg))


def test_evaluation_during_a_stage_evaluates_the_branch_average(models, tmp_path, monkeypatch):
  cfg, setup, base, branches = models
  recorded = []
  monkeypatch.setattr(evaluation, "evaluate_stacked", fake_evaluate(recorded))
  ctx = run_context(cfg, setup, base, tmp_path)
  stage = stages.copd_stage(spec_of(cfg).rl, list(CAPS))
  out = loop.evaluate_branches(ctx, stage, branches, ctx.eval_sets, merge=True)
  ctx.writer.close()
  assert "merged/accuracy/overall" in out
  merged = [r for r in recorded if jax.tree.leaves(r)[0].shape[0] == 1]
  assert len(merged) == 1
  assert_leaves_close(jax.tree.map(lambda x: x[0], merged[0]), numpy_average(branches, [1, 1, 1]))


def test_final_report_evaluates_and_saves_the_branches_and_their_average(models, tmp_path,
                                                                         monkeypatch):
  cfg, setup, base, branches = models
  cfg = cfg.copy_and_resolve_references()
  cfg.workdir = str(tmp_path)
  recorded = []
  monkeypatch.setattr(evaluation, "evaluate_stacked", fake_evaluate(recorded))
  ctx = run_context(cfg, setup, base, tmp_path)
  stage = stages.copd_stage(spec_of(cfg).rl, list(CAPS))
  summary = methods._final_report(ctx, stage, branches, 0.0)
  ctx.writer.close()
  assert summary["final"] == summary["merged"]  # CoPD delivers the merged model
  assert len(recorded) == 2
  assert_leaves_close(recorded[0], [np.asarray(x) for x in jax.tree.leaves(branches)])
  assert_leaves_close(jax.tree.map(lambda x: x[0], recorded[1]),
                      numpy_average(branches, [1, 1, 1]))
