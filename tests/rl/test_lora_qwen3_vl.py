"""LoRA branches on Qwen3-VL (the committed tiny random checkpoint): the sampler of a LoRA
run draws from each branch's effective weights W + scale * B A, a teacher scores another
branch's rows with ITS effective weights, and the OPD update with AdamW moves only the
adapters.

The oracle for a branch is its full weights written out by hand in numpy (kernel [in, out]
+ scale * (B @ A)^T per target projection) run through the transformers-parity whole-row
forward of tests/rl/test_qwen3_vl_training.py -- not the LoRA code path under test."""
import jax
import numpy as np
import pytest

from copd_jax.models import lora, stacked
from copd_jax.rl import scoring
from copd_jax.rl import update as update_lib
from test_qwen3_vl_training import (  # noqa: F401 (model, ref: the module fixtures)
    FIXTURE, G, P, make_rows, model, oracle_logprobs, ref, routing_arrays, ucfg)
from tiny_model import one_device_run

RANK, ALPHA = 2, 4.0


def lora_branches(base, num=2, seed=0):
  """LoRA branches on the checkpoint with random A and random, non-zero B (B = 0, the
  initial state, would make every branch the base and hide an ignored adapter)."""
  branches = stacked.initial_branches(base, num, lora.LoraSpec(rank=RANK, alpha=ALPHA),
                                      jax.random.key(seed))
  leaves, tree = jax.tree.flatten(branches.adapters)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return branches.replace(adapters=jax.tree.unflatten(
      tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def effective_by_hand(base, adapters, k, scale):
  """Branch k's full weights in numpy: every adapted kernel [in, out] + scale * (B A)^T,
  B = adapters[...]["lora_b"][k] [out, r], A = adapters[...]["lora_a"][k] [r, in]."""
  out = jax.tree.map(np.asarray, base)
  count = 0
  for layer, modules in adapters.items():
    for module, projections in modules.items():
      for name, ab in projections.items():
        a = np.asarray(ab["lora_a"][k], np.float64)
        b = np.asarray(ab["lora_b"][k], np.float64)
        kernel = out[layer][module][name]["kernel"]
        out[layer][module][name] = dict(
            out[layer][module][name], kernel=(kernel + scale * (b @ a).T).astype(np.float32))
        count += 1
  assert count > 0
  return out


def test_lora_sampler_draws_from_the_effective_weights(model, ref):
  cfg, base = model
  branches = lora_branches(base)
  assert "visual" not in branches.adapters  # the text decoder only
  rows = make_rows(cfg, ref, branches)
  live = np.asarray(rows.response_mask[:, :, P - 1:-1]) > 0  # [2, 8, NEW]
  assert live[:, :, 0].all()
  for k in range(2):
    rows_k = jax.tree.map(lambda x, k=k: x[k], rows)
    want = oracle_logprobs(effective_by_hand(base, branches.adapters, k, ALPHA / RANK),
                           cfg, ref, k, rows_k)
    sampled = np.asarray(rows.old_logprobs[k, :, P - 1:-1])
    np.testing.assert_allclose(sampled[live[k]], want[live[k]], atol=2e-4)
    # The adapters matter: the base scores the same tokens differently.
    plain = oracle_logprobs(base, cfg, ref, k, rows_k)
    assert np.abs(plain[live[k]] - want[live[k]]).max() > 1e-3


def test_lora_opd_update_with_adamw_moves_only_the_adapters(model, ref):
  cfg, base = model
  branches = lora_branches(base, seed=3)
  rows = make_rows(cfg, ref, branches, seed=1)
  optimizer = update_lib.make_optimizer(1e-3, 1.0)  # AdamW, as training uses
  state = update_lib.init_optimizer_state(optimizer, branches)
  # AdamW state on the adapters only: its moments have the adapters' tree and shapes,
  # and nothing in it is as large as a base tensor of the text decoder.
  adapter_shapes = {tuple(x.shape) for x in jax.tree.leaves(branches.adapters)}
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  adapter_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(branches.adapters))
  assert 2 * adapter_bytes <= state_bytes < 2 * adapter_bytes + 64
  big = [tuple(x.shape) for x in jax.tree.leaves(state) if x.ndim >= 2]
  assert big and set(big) <= adapter_shapes, set(big) - adapter_shapes
  u = ucfg(cfg)
  new_train_state, metrics = update_lib.update(
      update_lib.UpdateFn(one_device_run(u.model), u, optimizer),
      update_lib.TrainState(branches, state), rows,
      scoring.Teachers(branches, routing_arrays(), 2 * G))
  new, new_state = new_train_state.params, new_train_state.opt_state
  assert rows.prompt_len == P
  assert isinstance(new, lora.LoraBranches)
  assert np.asarray(metrics["update_applied"]).tolist() == [1.0, 1.0]
  assert (np.asarray(metrics["opd/tokens"]) > 0).all()
  # The shared base, vision tower included, is bitwise unchanged.
  old_base = jax.tree_util.tree_flatten_with_path(branches.base)[0]
  new_base = jax.tree.leaves(new.base)
  assert len(old_base) == len(new_base)
  for (path, a), b in zip(old_base, new_base):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a),
                                  err_msg=jax.tree_util.keystr(path))
  # Every adapter of every branch moved (B != 0, so A gets a gradient too).
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(branches.adapters)[0],
                          jax.tree.leaves(new.adapters)):
    for k in range(2):
      assert np.abs(np.asarray(b[k]) - np.asarray(a[k])).max() > 0, \
          (jax.tree_util.keystr(path), k)
  # The new AdamW state is still on the adapters only, and its moments were written.
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  moments = [x for x in jax.tree.leaves(new_state) if x.ndim >= 2]
  assert all(np.abs(np.asarray(x)).max() > 0 for x in moments)


def test_lora_teachers_score_cross_rows_with_their_own_merged_weights(model, ref):
  """Each student's cross rows are scored by the OTHER branch: the shared base plus that
  teacher's adapter, i.e. a plain forward of W + scale * B_t A_t written out by hand --
  not the student's adapter, not the bare base."""
  cfg, base = model
  branches = lora_branches(base, seed=5)
  rows = make_rows(cfg, ref, branches, seed=4)
  live = np.asarray(rows.response_mask[:, :, P - 1:-1]) > 0  # [2, 8, NEW]
  teacher = scoring.score_by_teachers(scoring.Teachers(branches, routing_arrays()), rows,
                                      ucfg(cfg))
  scale = ALPHA / RANK
  for k in range(2):
    rows_k = jax.tree.map(lambda x, k=k: x[k], rows)
    cross = live[k].copy()
    cross[:2 * G] = False  # rows 0..3 native (never scored by a teacher), 4..7 cross
    assert cross.any()
    want = oracle_logprobs(effective_by_hand(base, branches.adapters, 1 - k, scale),
                           cfg, ref, k, rows_k)
    got = np.asarray(teacher[k])
    np.testing.assert_allclose(got[cross], want[cross], atol=2e-4)
    # The check can tell teachers apart: the student's own merged weights (and the base)
    # score these tokens differently.
    own = oracle_logprobs(effective_by_hand(base, branches.adapters, k, scale),
                          cfg, ref, k, rows_k)
    plain = oracle_logprobs(base, cfg, ref, k, rows_k)
    assert np.abs(own[cross] - want[cross]).max() > 1e-3
    assert np.abs(plain[cross] - want[cross]).max() > 1e-3
