"""End to end on a Qwen3-VL checkpoint: records with images of two sizes and videos ->
copd_jax.main (2 CoPD steps: one RL step, then one OPD step in which the image and the
video branch teach each other) -> export of the merged model -> reload with our importer.
Also on a mesh with one device per branch (expert=3)."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import paths
from copd_jax.config_lib import spec_of
from copd_jax import export, main, policy_setup
from copd_jax.data import records, vl_prompts
from copd_jax.models import qwen3_vl_decode, qwen3_vl_import

REPO = paths.REPO
import child_processes  # noqa: E402
import fixture_configs  # noqa: E402
import xla_env  # noqa: E402

VL_CHECKPOINT, _, VL_FILES = fixture_configs.FIXTURES["hf_vl_copd"]

# A reward with spread inside every group, so the RL step moves each branch on its own
# domain and the OPD step has something to distil (the random fixture never answers right).
REWARD_PLUGIN = '''
def length(response, example):
  return min(len(response.strip()), 16) / 16.0
'''


def vl_config(workdir, reward_module, **mesh):
  cfg = fixture_configs.load("hf_vl_copd", "math,chart,clip,micro")
  cfg.workdir = str(workdir)
  cfg.rl.opd.topology = "full"  # image <-> video teach each other too, not only the hub
  if reward_module:  # None: the built-in verifier (tests that never score)
    cfg.reward.fn = f"{reward_module}:length"
  cfg.reward.workers = 1
  cfg.log.completions_every = 1
  cfg.mesh.update(mesh)
  return cfg


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
  folder = tmp_path_factory.mktemp("plugin")
  (folder / "vl_length_reward.py").write_text(REWARD_PLUGIN)
  sys.path.insert(0, str(folder))
  yield "vl_length_reward", str(folder)
  sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, reward_module):
  workdir = tmp_path_factory.mktemp("vl") / "run"
  summary = main.run(vl_config(workdir, reward_module[0]))
  return workdir, summary


def step_metrics(workdir, step):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record.get("step") == step:
        out.update(record)
  return out


def cross_pairs(workdir, step):
  """{(student, teacher)} of the cross rows logged at a training step."""
  pairs = set()
  with open(os.path.join(workdir, "completions.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["step"] == step and record.get("row") == "cross":
        pairs.add((record["branch"], record["teacher"]))
  return pairs


def test_records_keep_several_images_of_their_own_sizes_and_the_video_rate(tmp_path):
  source = records.RecordSource(VL_FILES["chart"][0], capability="chart",
                                native_media=True)
  sizes = {source[i].media.images[0].shape for i in range(len(source))}
  assert len(sizes) == 2  # the fixture's two image sizes
  clip = records.RecordSource(VL_FILES["clip"][0], capability="clip",
                              native_media=True)[0]
  assert clip.media.video.shape[0] == 3 and clip.media.video_fps == 2.0
  image = os.path.join(os.path.dirname(VL_FILES["chart"][0]), "image0.png")
  two = tmp_path / "two.jsonl"
  two.write_text(json.dumps({"prompt": "Which is larger?", "answer": "1",
                             "verifier": "integer", "images": [image, image]}) + "\n")
  assert len(records.RecordSource(str(two), capability="chart",
                                  native_media=True)[0].media.images) == 2
  with pytest.raises(ValueError, match=r"two.jsonl:1: field 'images' has 2 images"):
    # the toy model's frames take one image: the record is named
    records.RecordSource(str(two), capability="chart", image_size=8, num_frames=2)


def test_copd_trains_image_and_video_branches_and_the_export_reloads(finished_run, tmp_path):
  workdir, summary = finished_run
  assert summary["steps"] == 2
  assert summary["updates"]["copd"] == {b: {"applied": 2, "skipped": 0}
                                        for b in ("math", "chart", "clip")}
  # Step 1 is RL (rewards spread within groups), step 2 OPD.
  assert step_metrics(workdir, 1)["train/opd_weight"] == 0.0
  second = step_metrics(workdir, 2)
  assert second["train/opd_weight"] == 1.0
  pairs = cross_pairs(workdir, 2)
  assert ("chart", "clip") in pairs and ("clip", "chart") in pairs, pairs
  for branch in ("chart", "clip"):
    assert second[f"train/{branch}/opd/tokens"] > 0
    # The teacher scored the student's rows differently from the student: the RL step
    # left the branches apart, so the distillation signal is not zero.
    assert second[f"train/{branch}/opd/delta_std"] > 1e-6

  _, _, merged = export.load_run_policy(str(workdir))
  _, _, chart = export.load_run_policy(str(workdir), "chart")
  _, _, clip = export.load_run_policy(str(workdir), "clip")
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(chart), jax.tree.leaves(clip)))
  assert moved > 0  # the branches differ at the end

  out = tmp_path / "exported"
  export.export_run(str(workdir), str(out), dtype="float32")
  cfg, reloaded = qwen3_vl_import.load_qwen3_vl(str(out))
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(reloaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name in ("preprocessor_config.json", "video_preprocessor_config.json", "tokenizer.json"):
    assert (out / name).is_file()

  # The reloaded model answers a prompt with an image exactly as the trained one does.
  setup = policy_setup.build_setup(spec_of(vl_config(workdir, None)))
  example = records.RecordSource(VL_FILES["chart"][0], capability="chart",
                                 native_media=True)[0]
  batch = setup.encode_prompts([example])
  prefill = jax.jit(qwen3_vl_decode.prefill, static_argnums=1)  # one program, not eager ops
  logits = [prefill(p, setup.model_cfg, batch.tokens, batch.mask, batch.frames)[0]
            for p in (merged, reloaded)]
  np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(logits[1]))


def test_the_same_run_on_an_expert_mesh(finished_run, reward_module, tmp_path):
  """expert=3: one device per branch, in a process of its own with 3 simulated devices (3
  does not divide the suite's 8). The update on expert=3 x data=2 is compared with one
  device in tests/rl/test_qwen3_vl_training.py; this is the whole run (sampler,
  evaluation, diagnostics, export) on a mesh."""
  workdir, _ = finished_run
  mesh_dir = tmp_path / "mesh"
  module, folder = reward_module
  script = (
      "import sys; sys.path[:0] = [%r, %r]\n"
      "import test_qwen3_vl_run as t\n"
      "from copd_jax import main\n"
      "main.run(t.vl_config(%r, %r, expert=3, data=1))\n"
  ) % (folder, paths.TESTS, str(mesh_dir), module)
  env = xla_env.cpu_devices_env(3, dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO, os.path.join(REPO, "configs"), os.environ.get("PYTHONPATH", "")])))
  with child_processes.multi_device_slot():
    child_processes.finish(child_processes.start(child_processes.python_code(script),
                                                 cwd=REPO, env=env),
                           budget_s=1800, what="the expert-mesh run")
  with open(mesh_dir / "summary.json") as f:
    summary = json.load(f)
  assert summary["updates"]["copd"]["chart"] == {"applied": 2, "skipped": 0}
  assert ("chart", "clip") in cross_pairs(mesh_dir, 2)
  _, _, on_mesh = export.load_run_policy(str(mesh_dir), "chart")
  _, _, single = export.load_run_policy(str(workdir), "chart")
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(on_mesh)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bad_records_are_named_before_anything_compiles(tmp_path):
  big = tmp_path / "big.jsonl"
  image = os.path.join(os.path.dirname(VL_FILES["chart"][0]), "image0.png")
  big.write_text(json.dumps({"id": "wide", "prompt": "Count.", "answer": "1",
                             "verifier": "integer", "images": [image] * 3}) + "\n")
  cfg = vl_config(tmp_path / "run", None)
  cfg.data.train_files["chart"] = str(big)
  cfg.data.vision_budget = 16  # three 32 x 48 images make 72 patches
  with pytest.raises(ValueError, match=r"big.jsonl:1 \(id wide\).*72 patches.*"
                     r"config.data.vision_budget=16"):
    policy_setup.build_setup(spec_of(cfg))
  cfg.data.vision_budget = 0
  cfg.data.max_prompt_len = 40  # the text records need 24 tokens, this one 44
  with pytest.raises(ValueError, match=r"\(id wide\): the prompt needs 44 tokens.*"
                     r"config.data.max_prompt_len=40"):
    policy_setup.build_setup(spec_of(cfg))
  no_fps = tmp_path / "no_fps.jsonl"
  frames = [os.path.join(os.path.dirname(VL_FILES["clip"][0]), f"video0_{i}.png")
            for i in range(3)]
  no_fps.write_text(json.dumps({"id": "v", "prompt": "Count.", "answer": "1",
                                "verifier": "integer", "video_frames": frames}) + "\n")
  cfg = vl_config(tmp_path / "run", None)
  cfg.data.eval_files["clip"] = str(no_fps)
  with pytest.raises(ValueError, match=r"no_fps.jsonl:1 \(id v\).*video_fps"):
    policy_setup.build_setup(spec_of(cfg))
  # A checkpoint whose vision config we do not support: named with its file and field.
  checkpoint = tmp_path / "relu_checkpoint"
  shutil.copytree(VL_CHECKPOINT, checkpoint)
  config = json.loads((checkpoint / "config.json").read_text())
  config["vision_config"]["hidden_act"] = "relu"
  (checkpoint / "config.json").write_text(json.dumps(config))
  cfg = vl_config(tmp_path / "run", None)
  cfg.init.hf_checkpoint = str(checkpoint)
  with pytest.raises(ValueError, match=r"relu_checkpoint/config.json: .*vision_config.hidden_act"):
    policy_setup.build_setup(spec_of(cfg))
  cfg = vl_config(tmp_path / "run", None)
  cfg.data.train_files = {}
  cfg.data.eval_files = {}
  with pytest.raises(ValueError, match="Qwen3-VL checkpoint, which trains on record files"):
    policy_setup.build_setup(spec_of(cfg))


def test_prompt_batches_share_one_vision_budget():
  cfg = vl_config("/tmp/unused", None)
  setup = policy_setup.build_setup(spec_of(cfg))
  examples = [records.RecordSource(VL_FILES[d][0], capability=d,
                                   native_media=True)[i]
              for d, i in (("chart", 0), ("chart", 3), ("clip", 0), ("math", 0))]
  batch = setup.encode_prompts(examples)
  assert isinstance(batch.frames, qwen3_vl_decode.PromptMedia)
  budget = batch.frames.patches.shape[1]
  assert batch.frames.patches.shape[0] == 4
  # The budget is the most any record needs, and the text prompt's media are all padding.
  processor = vl_prompts.VLPromptProcessor.from_checkpoint(cfg.init.hf_checkpoint)
  media = [processor.encode_example(ex)[1] for ex in examples]
  needed = [len(m.get("pixel_values", [])) + len(m.get("pixel_values_videos", []))
            for m in media]
  assert budget >= max(needed) and budget % setup.model_cfg.vision.merge_unit == 0
  assert (np.asarray(batch.frames.layout[3])[3] == -1).all()
  assert set(setup.banned_token_ids) >= {setup.model_cfg.image_token_id,
                                         setup.model_cfg.video_token_id}
