"""Sizes checked before anything is allocated (issue 30, item 2).

Found on main: at 1e6 to 1e9, rl.native_prompts, rl.samples_per_prompt,
rl.diagnostic_prompts and warm_start.batch_size ended in a raw numpy _ArrayMemoryError
(22-67 GiB); model.d_model = 1e9 aborted the process (exit code 134); eval.num_examples =
1e9 ran for 7 minutes while memory grew. Now the config's buffers are estimated first and
a config that cannot fit is one error naming the field and the estimate."""
import os
import re
import subprocess
import sys
import tracemalloc

import jax
import numpy as np
import pytest

import paths
from copd_jax.config_lib import spec_of
from copd_jax import config_lib, default_config, main, memory_budget, policy_setup

REPO = paths.REPO
sys.path.insert(0, os.path.join(REPO, "configs"))


def test_the_issue_command_exits_1_with_one_line_naming_the_field_and_bytes():
  command = [sys.executable, "-m", "copd_jax.main", "--config=configs/copd.py:micro",
             "--config.rl.native_prompts=1000000000", "--dry_run"]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 1, done.stdout + done.stderr
  lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
  assert len(lines) == 1, lines
  assert lines[0].startswith("error: config.rl.native_prompts=1000000000"), lines[0]
  assert re.search(r"needs about [\d.]+ TiB \(\d+ bytes", lines[0]), lines[0]


ABSURD = [("copd", "rl.native_prompts"), ("copd", "rl.samples_per_prompt"),
          ("copd", "rl.diagnostic_prompts"), ("copd", "warm_start.batch_size"),
          ("copd", "model.d_model"), ("base", "model.d_model"),
          ("base", "eval.num_examples"), ("copd", "eval.num_examples")]


# d_model = 1e6 is left out: its micro model (64 x 1e6 embedding, 1 layer of 1e6 x 64 MLP,
# 2 x 1e6 x 32 attention) is a few GiB, not absurd.
@pytest.mark.parametrize("method, field, value", [
    (m, f, v) for m, f in ABSURD for v in (10 ** 6, 10 ** 9)
    if not (f == "model.d_model" and v == 10 ** 6)])
def test_an_absurd_size_is_an_error_naming_it_before_anything_is_allocated(method, field,
                                                                           value):
  cfg = default_config.get(method, "micro")
  default_config.set_field(cfg, field, value)
  tracemalloc.start()
  try:
    with pytest.raises(memory_budget.MemoryBudgetError,
                       match=rf"^config\.{re.escape(field)}={value}: the run needs about "
                             r"[\d.]+ \w+ \(\d+ bytes"):
      config_lib.validate_config(cfg)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 64 * 2 ** 20  # nothing sized by the field was built


def test_d_model_1e9_is_a_named_error_from_main_run_not_an_abort(tmp_path):
  cfg = default_config.get("base", "micro")
  cfg.workdir = str(tmp_path / "run")
  cfg.model.d_model = 10 ** 9
  with pytest.raises(memory_budget.MemoryBudgetError, match=r"config\.model\.d_model"):
    main.run(cfg)
  assert not os.path.exists(cfg.workdir)  # refused before anything was written


@pytest.mark.parametrize("preset", ["micro", "toy"])
def test_the_parameter_count_matches_the_models_own_shapes(preset):
  """Oracle: the parameters the model's init really builds (eval_shape, no arrays)."""
  cfg = default_config.get("copd", preset)
  setup = policy_setup.build_setup(spec_of(cfg))
  shapes = jax.eval_shape(lambda k: policy_setup.init_policy_params(setup.model_cfg, k),
                          jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert memory_budget._toy_dims(cfg).params() == count


def test_the_rollout_estimate_grows_linearly_with_the_prompts():
  """Hand computation: 10x the native prompts (no cross prompts) is 10x the rollout part."""
  cfg = default_config.get("copd", "micro")
  cfg.rl.cross_prompts = 0
  small = memory_budget.estimate(cfg).parts["rollouts of one step"]
  cfg.rl.native_prompts *= 10
  big = memory_budget.estimate(cfg).parts["rollouts of one step"]
  assert big == (10 * small[0], 10 * small[1])


def test_the_presets_fit_and_the_dry_run_prints_the_estimate(tmp_path):
  cfg = default_config.get("copd", "toy")
  cfg.workdir = str(tmp_path / "run")
  est = memory_budget.check(cfg)
  assert 0 < est.total < memory_budget.machine_memory_bytes()
  text = main.dry_run(cfg)
  assert re.search(r"# memory estimate: [\d.]+ MiB against this machine's [\d.]+ GiB", text)


def test_a_pod_config_is_checked_against_its_hbm_not_this_machine():
  import pod_4b
  cfg = config_lib.without_unset_paths(pod_4b.get_config())  # no checkpoint or data: sizes
  est = memory_budget.check(cfg)  # the paper's setting fits 95 GiB per chip
  per_chip = memory_budget.device_bytes_per_chip(cfg, est)
  assert per_chip < cfg.pod.hbm_bytes_per_chip < est.device  # per chip, not the whole
  cfg.rl.native_prompts = 100_000
  with pytest.raises(memory_budget.MemoryBudgetError,
                     match=r"config\.rl\.native_prompts=100000: .* of HBM per chip"):
    memory_budget.check(cfg)
  cfg.rl.native_prompts = 192
  cfg.pod.hbm_bytes_per_chip = per_chip - 1  # one byte short
  with pytest.raises(memory_budget.MemoryBudgetError):
    memory_budget.check(cfg)
  cfg.pod.hbm_bytes_per_chip = 0  # unknown HBM: not checked against this machine instead
  assert memory_budget.check(cfg).total == est.total


def test_human_sizes_are_exact_for_huge_integers():
  assert memory_budget.human(1536) == "1.5 KiB"
  assert memory_budget.human(3 * 2 ** 30) == "3.0 GiB"
  assert memory_budget.human(10 ** 400).endswith("EiB")  # no float overflow
