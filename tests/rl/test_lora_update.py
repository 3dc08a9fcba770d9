"""LoRA branches in the RL/OPD update: the adapters' update equals full fine-tuning
restricted to the rank-r subspace (the same loss on W + scale B A, differentiated by hand
with plain jax.grad), the base gets no gradient and no optimizer state, and teachers
score as their shared base plus their own adapter."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from copd_jax import config_lib, default_config, kernels, losses, policy_setup, sampling
from copd_jax.data import toy_tasks as tasks
from copd_jax.models import decoder as M, lora, stacked
from copd_jax.rl import rollout as rollout_lib, rows as rows_lib, scoring, stages, update as update_lib
from tiny_model import one_device_run


@pytest.fixture(scope="module")
def setup():
  cfg = default_config.get("copd", "micro")
  return policy_setup.build_setup(config_lib.spec_of(cfg))


def ucfg_for(setup_obj):
  return rows_lib.UpdateConfig(model=setup_obj.model_cfg, loss=losses.PolicyLossConfig(),
                               kernel=kernels.KernelConfig(backend="chunked", vocab_tile=32,
                                                           token_tile=64))


def lora_branches(setup_obj, num, seed=0):
  base = M.init_params(setup_obj.model_cfg, jax.random.key(seed))
  branches = stacked.initial_branches(base, num, lora.LoraSpec(rank=2, alpha=4.0),
                                      jax.random.key(seed + 1))
  # Non-zero B, so that A gets a gradient too (with B = 0 only B does).
  leaves, tree = jax.tree.flatten(branches.adapters)
  keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
  return branches.replace(adapters=jax.tree.unflatten(
      tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def sampled_rows(setup_obj, params, caps, n_prompts=2, g=2, seed=0):
  """The LoRA branches' own rollouts (the training sampler) as rows_lib.Rows [S, ...]."""
  batches = [setup_obj.encode_prompts(
      [tasks.make_example(c, i, seed=seed, difficulty=1, **setup_obj.example_kwargs)
       for i in range(n_prompts)]) for c in caps]
  prompts = rollout_lib.stack_prompt_batches(batches)
  s = len(caps)
  sampler = sampling.Sampler(
      setup_obj.model_cfg,
      sampling.SamplingConfig(max_new_tokens=6, stop_token_ids=(2,),
                              banned_token_ids=policy_setup.never_generated_ids(
                                  setup_obj.tokenizer)), g)
  rollout = sampling.stacked_generate(one_device_run(setup_obj.model_cfg), params, sampler,
                                      prompts, jax.random.split(jax.random.key(seed), s))
  rows = rollout_lib.build_rows(prompts, rollout, np.zeros((s, n_prompts * g)),
                                np.zeros((s, n_prompts * g)))
  rows = dataclasses.replace(rows, prompt_len=0)  # every column scored, as below by hand
  rows.advantages = jnp.asarray(np.random.default_rng(seed).normal(size=rows.advantages.shape),
                                jnp.float32)
  return rows


def by_hand_effective(base, adapters_k, scale):
  """Full weights of one branch from its adapters, written out: W + scale * (B A)^T."""
  out = jax.tree.map(lambda x: x, base)
  for layer, modules in adapters_k.items():
    for module, projections in modules.items():
      for name, ab in projections.items():
        w = base[layer][module][name]["kernel"]
        out[layer][module][name] = {"kernel": w + scale * (ab["lora_b"] @ ab["lora_a"]).T}
  return out


def test_lora_update_is_full_fine_tuning_restricted_to_the_rank_r_subspace(setup):
  s = setup
  branches = lora_branches(s, 2)
  rows = sampled_rows(s, branches, ("text", "image"))
  ucfg = ucfg_for(s)
  lr = 0.05
  optimizer = optax.sgd(lr)
  fn = update_lib.UpdateFn(one_device_run(ucfg.model), ucfg, optimizer)
  state = update_lib.TrainState(branches, update_lib.init_optimizer_state(optimizer, branches))
  new_state, metrics = update_lib.update(fn, state, rows)
  new = new_state.params
  assert isinstance(new, lora.LoraBranches)
  # The shared base is untouched and unstacked.
  for a, b in zip(jax.tree.leaves(new.base), jax.tree.leaves(branches.base)):
    np.testing.assert_array_equal(a, b)

  def loss_on_full_weights(adapters, base, rows_k):  # the RL loss of W + scale B A, by hand
    params = by_hand_effective(base, adapters, branches.scale)
    return update_lib.student_loss(params, rows_k, None, None, ucfg)[0]
  grad_on_full_weights = jax.jit(jax.grad(loss_on_full_weights))  # one program, 2 branches
  moved = 0.0
  for k in range(2):
    rows_k = jax.tree.map(lambda x, k=k: x[k], rows)
    adapters_k = jax.tree.map(lambda x, k=k: x[k], branches.adapters)
    grads = grad_on_full_weights(adapters_k, branches.base, rows_k)
    want = jax.tree.map(lambda p, g: p - lr * g, adapters_k, grads)
    got = jax.tree.map(lambda x, k=k: x[k], new.adapters)
    for path, g, w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-6, rtol=1e-4,
                                 err_msg=jax.tree_util.keystr(path[0]))
    np.testing.assert_allclose(float(metrics["grad_norm"][k]),
                               float(optax.tree_utils.tree_norm(grads)), rtol=1e-4)
    moved = max(moved, max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)))
  assert moved > 1e-4  # the update did move the adapters


def test_adam_state_covers_the_adapters_only(setup):
  branches = lora_branches(setup, 3)
  optimizer = update_lib.make_optimizer(1e-3, 1.0)
  state = update_lib.init_optimizer_state(optimizer, branches)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  adapter_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(branches.adapters))
  # Adam: two moments per adapter entry, plus a step count per branch.
  assert adapter_bytes * 2 <= state_bytes < adapter_bytes * 2 + 64
  # Sharded like the model declares: adapters and their moments by their own paths.
  run = one_device_run(setup.model_cfg)
  run.opt_state(state)
  run.stacked_params(branches)


def test_teachers_score_with_the_shared_base_plus_their_own_adapter(setup):
  s = setup
  branches = lora_branches(s, 3, seed=4)
  rows = sampled_rows(s, branches, ("text", "image", "video"), seed=1)
  assignment = np.array([[1, 1], [2, 2], [0, 0]], np.int32)  # student k -> teacher k+1
  routing = stages.teacher_routing(assignment, 3, samples=2).as_arrays()
  ucfg = ucfg_for(s)
  got = scoring.score_by_teachers(scoring.Teachers(branches, routing), rows, ucfg)
  for k in range(3):
    teacher = stacked.take_expert(branches, (k + 1) % 3)  # W + scale B_j A_j, plain
    hidden = M.forward_hidden(teacher, s.model_cfg, rows.tokens[k], rows.positions[k],
                              rows.token_mask[k], rows.frames[k])
    want = kernels.sampled_token_logprobs(hidden, M.lm_head(teacher, s.model_cfg),
                                          rows_lib.next_token_targets(rows.tokens[k]))
    m = np.asarray(rows.response_mask[k]) > 0
    np.testing.assert_allclose(np.asarray(got[k])[m], np.asarray(want)[m], atol=1e-5)


@pytest.mark.parametrize("mesh_cfg", [
    dict(expert=2, data=1, fsdp=2, tensor=2),
    # Both branches on every device (expert=1): they run one after the other (lax.map).
    dict(expert=1, data=1, fsdp=4, tensor=2)])
def test_lora_opd_update_on_a_mesh_matches_one_device(mesh_cfg):
  from copd_jax import sharding
  from test_sharding import SMALL_VISION, opd_problem
  from tiny_model import tiny_config
  cfg = tiny_config(num_layers=1, vision=SMALL_VISION)
  full, rows, routing, ucfg, start = opd_problem(cfg)
  base = jax.tree.map(lambda x: x[0], full)
  branches = stacked.initial_branches(base, 2, lora.LoraSpec(rank=2, alpha=4.0),
                                      jax.random.key(7))
  leaves, tree = jax.tree.flatten(branches.adapters)
  keys = jax.random.split(jax.random.key(8), len(leaves))
  branches = branches.replace(adapters=jax.tree.unflatten(
      tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  optimizer = optax.sgd(0.05)
  opt_state = update_lib.init_optimizer_state(optimizer, branches)
  host_routing = {k: np.asarray(v) for k, v in routing.as_arrays().items()}
  want = update_lib.update(update_lib.UpdateFn(one_device_run(cfg), ucfg, optimizer),
                           update_lib.TrainState(branches, opt_state),
                           jax.tree.map(jnp.asarray, rows),
                           scoring.Teachers(branches, host_routing, start))
  run = sharding.RunSharding(sharding.make_mesh(mesh_cfg, jax.devices()[:8]),
                             param_axes=policy_setup.declared_param_axes(cfg))
  mesh_ucfg = dataclasses.replace(ucfg, micro_batch_rows=4)
  placed = run.shard_params(branches)
  # The base is sharded like today's parameters (no expert axis), the adapters lead with it.
  assert placed.base["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec[0] != "expert"
  assert placed.adapters["layers_0"]["mlp"]["up_proj"]["lora_a"].sharding.spec[0] == "expert"
  got = update_lib.update(update_lib.UpdateFn(run, mesh_ucfg, optimizer),
                          update_lib.TrainState(placed, opt_state),
                          dataclasses.replace(rows, prompt_len=10),
                          scoring.Teachers(placed, host_routing, start))
  assert float(np.abs(np.asarray(want[1]["opd/tokens"])).min()) > 0
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(run.to_host(got))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
