"""Training and teacher scoring of Qwen3-VL branches in the jitted update, on the committed
tiny random checkpoint (tests/fixtures/hf/qwen3_vl_tiny) and its reference prompts.

Two branches, image and video. Each student samples on its own prompts (native rows) and
on the other's (cross rows, scored by the other branch: on-policy distillation between an
image branch and a video branch). Prompts carry their media padded to a fixed vision budget
(qwen3_vl_decode.PromptMedia), so images of two sizes, a text-only prompt, a video and a
video + image prompt share one compiled update.

The oracle for every log-prob is the whole-call forward (qwen3_vl.forward_hidden over the
whole row, positions from get_rope_index), the path whose logits match transformers'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paths
from copd_jax import kernels, losses, sampling
from copd_jax.models import decoder, qwen3_vl, qwen3_vl_decode, qwen3_vl_import
from copd_jax.models import stacked as stacked_lib
from copd_jax.rl import (
  diagnostics,
  rollout as rollout_lib,
  rows as rows_lib,
  scoring,
  stages,
)
from copd_jax.rl import update as update_lib
from tiny_model import one_device_run, update_traces

FIXTURE = paths.QWEN3_VL_TINY
IMAGE_PAD, VIDEO_PAD, STOP = 100, 101, 2
P, G, NEW, BUDGET = 23, 2, 5, 64


@pytest.fixture(scope="module")
def model():
  return qwen3_vl_import.load_qwen3_vl(FIXTURE)


@pytest.fixture(scope="module")
def ref():
  return paths.reference_outputs(FIXTURE)


def _left_pad(ids, mask, length=P):
  pad = length - ids.shape[1]
  return (np.pad(ids, [(0, 0), (pad, 0)]), np.pad(mask, [(0, 0), (pad, 0)]))


def prompts(ref):
  """{'image': (ids [2, P], mask, media), 'video': ...}: image prompts are one with two
  images of different sizes and one without media; video prompts are a video and a video
  plus an image."""
  ids, mask = _left_pad(ref["image_input_ids"], ref["image_attention_mask"])
  image = (ids, mask, [dict(pixel_values=ref["image_pixel_values"],
                            image_grid_thw=ref["image_grid_thw"]), {}])
  video_item = dict(pixel_values_videos=ref["video_pixel_values"],
                    video_grid_thw=ref["video_grid_thw"])
  first = int(np.prod(ref["image_grid_thw"][0]))
  mixed_item = dict(video_item, pixel_values=ref["image_pixel_values"][first:],
                    image_grid_thw=ref["image_grid_thw"][1:])
  ids = np.concatenate([_left_pad(ref["video_input_ids"], ref["video_attention_mask"])[0],
                        ref["mixed_input_ids"]])
  mask = np.concatenate([_left_pad(ref["video_input_ids"], ref["video_attention_mask"])[1],
                         ref["mixed_attention_mask"]])
  return {"image": image, "video": (ids, mask, [video_item, mixed_item])}


def student_prompts(cfg, ref, order):
  """Per student: its own two prompts (native), then the other's two (cross)."""
  sets = prompts(ref)
  ids, mask, media = [], [], []
  for own, other in order:
    ids.append(np.concatenate([sets[own][0], sets[other][0]]))
    mask.append(np.concatenate([sets[own][1], sets[other][1]]))
    media.append(qwen3_vl_decode.prompt_media(cfg, ids[-1], mask[-1],
                                              sets[own][2] + sets[other][2], BUDGET))
  stack = lambda *xs: jnp.stack(xs)  # noqa: E731
  return (jnp.asarray(np.stack(ids), jnp.int32), jnp.asarray(np.stack(mask), bool),
          jax.tree.map(stack, *media))


def branches(params, count=2, scale=0.02):
  """`count` different branches: the checkpoint plus seeded noise each."""
  def noisy(seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + scale * rng.normal(size=x.shape).astype(np.float32),
                        params)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[noisy(k) for k in range(count)])


def ucfg(cfg):
  return rows_lib.UpdateConfig(model=cfg, loss=losses.PolicyLossConfig(),
                               kernel=kernels.KernelConfig(backend="chunked", vocab_tile=32,
                                                           token_tile=64),
                               samples_per_prompt=G)


def sampler():
  return sampling.SamplingConfig(max_new_tokens=NEW, temperature=1.0, stop_token_ids=(STOP,),
                                 banned_token_ids=(IMAGE_PAD, VIDEO_PAD))


def make_rows(cfg, ref, stacked, opd_beta=1.0, seed=0):
  """Rows [2, 8, P + NEW] of the image (0) and video (1) students; rows 4..7 are cross."""
  prompts_ = sampling.Prompts(*student_prompts(cfg, ref, [("image", "video"), ("video", "image")]))
  rollout = sampling.stacked_generate(one_device_run(cfg), stacked,
                                      sampling.Sampler(cfg, sampler(), G), prompts_,
                                      jax.random.split(jax.random.key(seed), 2))
  beta = np.zeros((2, 4 * G), np.float32)
  beta[:, 2 * G:] = opd_beta
  rows = rollout_lib.build_rows(prompts_, rollout, np.zeros((2, 4 * G)), beta)
  assert rows.prompt_len == P
  return rows


def routing_arrays():
  # Student 0 (image) sends its 2 cross prompts to teacher 1 (video), and back.
  assignment = np.array([[1, 1], [0, 0]], np.int32)
  return stages.teacher_routing(assignment, 2, samples=G, native_rows=2 * G).as_arrays()


def oracle_logprobs(params, cfg, ref, student, rows_k):
  """Log-probs f32[8, NEW] of student `student`'s rows' response tokens under `params`,
  each row run whole through the transformers-parity forward."""
  logp = oracle_response_logp(params, cfg, ref, student, rows_k)
  targets = np.asarray(rows_k.tokens)[:, P:]
  return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def oracle_response_logp(params, cfg, ref, student, rows_k):
  """f32[8, NEW, V]: the next-token log-softmax at the columns that predict student
  `student`'s response tokens, each row run whole through the transformers-parity
  forward."""
  sets = prompts(ref)
  own, other = ("image", "video") if student == 0 else ("video", "image")
  media = sets[own][2] + sets[other][2]
  tokens, mask = np.asarray(rows_k.tokens), np.asarray(rows_k.token_mask)
  out = []
  for r in range(tokens.shape[0]):
    item = media[r // G]
    positions, _ = qwen3_vl.get_rope_index(cfg, tokens[r:r + 1], mask[r:r + 1],
                                           item.get("image_grid_thw"),
                                           item.get("video_grid_thw"))
    vision = {}
    if item.get("pixel_values") is not None:
      vision.update(pixel_values=jnp.asarray(item["pixel_values"]),
                    image_grids=tuple(map(tuple, np.asarray(item["image_grid_thw"]).tolist())))
    if item.get("pixel_values_videos") is not None:
      vision.update(pixel_values_videos=jnp.asarray(item["pixel_values_videos"]),
                    video_grids=tuple(map(tuple, np.asarray(item["video_grid_thw"]).tolist())))
    hidden = qwen3_vl.forward_hidden(params, cfg, jnp.asarray(tokens[r:r + 1]),
                                     jnp.asarray(mask[r:r + 1], jnp.int32),
                                     jnp.asarray(positions, jnp.int32), **vision)
    logp = jax.nn.log_softmax(decoder.logits_from_hidden(hidden, qwen3_vl.lm_head(params, cfg)))
    out.append(np.asarray(logp[0, P - 1:-1], np.float64))
  return np.stack(out)


def test_rows_reproduce_the_sampler_and_teachers_score_cross_rows_like_the_oracle(model, ref):
  cfg, params = model
  stacked = branches(params)
  rows = make_rows(cfg, ref, stacked)
  live = np.asarray(rows.response_mask[:, :, P - 1:-1]) > 0  # [2, 8, NEW]
  assert live[:, :, 0].all()
  teacher = scoring.score_by_teachers(scoring.Teachers(stacked, routing_arrays()), rows, ucfg(cfg))
  for k in range(2):
    rows_k = jax.tree.map(lambda x: x[k], rows)
    own = oracle_logprobs(stacked_lib.take_expert(stacked, k), cfg, ref, k, rows_k)
    sampled = np.asarray(rows.old_logprobs[k, :, P - 1:-1])
    np.testing.assert_allclose(sampled[live[k]], own[live[k]], atol=2e-4)
    # Cross rows (4..7) scored by the other branch, native rows not at all.
    other = oracle_logprobs(stacked_lib.take_expert(stacked, 1 - k), cfg, ref, k, rows_k)
    got = np.asarray(teacher[k])
    cross = live[k].copy()
    cross[:2 * G] = False
    np.testing.assert_allclose(got[cross], other[cross], atol=2e-4)
    assert np.abs(other[cross] - own[cross]).max() > 1e-3  # the teachers do differ


def test_opd_update_moves_each_student_toward_its_teacher_and_compiles_once(model, ref,
                                                                            monkeypatch):
  cfg, params = model
  stacked = branches(params)
  rows = make_rows(cfg, ref, stacked, seed=1)
  optimizer = update_lib.make_optimizer(1e-3, 1.0)
  opt_state = update_lib.init_optimizer_state(optimizer, stacked)
  u = ucfg(cfg)
  fn = update_lib.UpdateFn(one_device_run(u.model), u, optimizer)
  traces = update_traces(monkeypatch)
  new_state, metrics = update_lib.update(fn, update_lib.TrainState(stacked, opt_state), rows,
                                         scoring.Teachers(stacked, routing_arrays()))
  new = new_state.params
  assert np.asarray(metrics["update_applied"]).tolist() == [1.0, 1.0]
  assert (np.asarray(metrics["opd/tokens"]) > 0).all()
  for k in range(2):
    rows_k = jax.tree.map(lambda x: x[k], rows)
    live = np.asarray(rows_k.response_mask[:, P - 1:-1]) > 0
    live[:2 * G] = False  # cross rows: advantages are 0, only the OPD signal acts
    student = oracle_logprobs(stacked_lib.take_expert(stacked, k), cfg, ref, k, rows_k)
    teacher = oracle_logprobs(stacked_lib.take_expert(stacked, 1 - k), cfg, ref, k, rows_k)
    after = oracle_logprobs(stacked_lib.take_expert(new, k), cfg, ref, k, rows_k)
    # The OPD advantage is log p_teacher - log p_student per token: to first order the
    # step raises the student's log-prob where the teacher's is higher, and lowers it
    # where lower.
    delta = (teacher - student)[live]
    moved = (after - student)[live]
    assert np.dot(delta, moved) > 0, (k, np.dot(delta, moved))
  # Other media (a second rollout: other responses, same budget) reuse the program.
  rows2 = make_rows(cfg, ref, new, seed=2)
  update_lib.update(fn, update_lib.TrainState(new, opt_state), rows2,
                    scoring.Teachers(new, routing_arrays()))
  assert len(traces) == 1


def test_vision_tower_runs_once_per_prompt_in_the_update(model, ref):
  cfg, params = model
  stacked = branches(params)
  rows = make_rows(cfg, ref, stacked, seed=3)
  u = ucfg(cfg)
  optimizer = update_lib.make_optimizer(1e-3, 1.0)
  opt_state = update_lib.init_optimizer_state(optimizer, stacked)
  with qwen3_vl_decode.vision_tower_calls() as seen:
    # micro_batch_rows changes the static config, so the update traces anew here.
    micro = rows_lib.UpdateConfig(**{**u.__dict__, "micro_batch_rows": 2 * G})
    update_lib.update(update_lib.UpdateFn(one_device_run(u.model), micro, optimizer),
                      update_lib.TrainState(stacked, opt_state), rows,
                      scoring.Teachers(stacked, routing_arrays()))
  # (prompts, patches) per traced tower call: students run their 4 prompts (8 rows) in
  # micro-batches of 2 prompts (4 rows); each teacher runs its 2 cross prompts (4 rows).
  # Prompts, never sample rows.
  assert sorted(seen) == [(2, BUDGET), (2, BUDGET)], seen


def test_bad_media_are_named_before_anything_compiles(model, ref):
  cfg, _ = model
  ids, mask, media = prompts(ref)["image"]
  with pytest.raises(ValueError, match="prompt 0: .*28 patches, more than the vision budget"):
    qwen3_vl_decode.prompt_media(cfg, ids, mask, media, budget=16)
  with pytest.raises(ValueError, match="prompt 0: input_ids hold 7 pad tokens .* is None"):
    qwen3_vl_decode.prompt_media(cfg, ids, mask, media[::-1], budget=BUDGET)
  odd = dict(media[0], image_grid_thw=np.array([[1, 3, 4], [1, 2, 2]]))
  with pytest.raises(ValueError, match="prompt 0: .*multiples of spatial_merge_size"):
    qwen3_vl_decode.prompt_media(cfg, ids, mask, [odd, {}], budget=BUDGET)
  with pytest.raises(ValueError, match="positive multiple of merge_size"):
    qwen3_vl_decode.prompt_media(cfg, ids, mask, media, budget=30)
  with pytest.raises(ValueError, match="prompt_len > 0"):
    scoring._response_hidden(None, ucfg(cfg), rows_lib.RowInputs(None, None, None, None), 0)


def test_three_branches_on_an_expert_mesh_match_the_single_device_update(model, ref,
                                                                          monkeypatch):
  """Text (hub), image and video branches on a 6-device mesh (expert=3 x data=2): the
  sharded update (media exchanged across `expert`) gives the update on a mesh of one
  device's parameters and metrics, and compiles once for two steps."""
  from copd_jax import sharding
  cfg, params = model
  sets = prompts(ref)
  text_prompts = (sets["image"][0][[1, 1]], sets["image"][1][[1, 1]], [{}, {}])
  sets["text"] = text_prompts
  order = [("text", ("image", "video")), ("image", ("text",)), ("video", ("text",))]
  ids, mask, media = [], [], []
  for own, teachers in order:
    cross = [(sets[t][0][0], sets[t][1][0], sets[t][2][0]) for t in teachers]
    if len(cross) == 1:
      cross.append((sets[teachers[0]][0][1], sets[teachers[0]][1][1], sets[teachers[0]][2][1]))
    ids.append(np.concatenate([sets[own][0], np.stack([c[0] for c in cross])]))
    mask.append(np.concatenate([sets[own][1], np.stack([c[1] for c in cross])]))
    media.append(qwen3_vl_decode.prompt_media(cfg, ids[-1], mask[-1],
                                              list(sets[own][2]) + [c[2] for c in cross],
                                              BUDGET))
  ids, mask = jnp.asarray(np.stack(ids), jnp.int32), jnp.asarray(np.stack(mask), bool)
  media = jax.tree.map(lambda *xs: jnp.stack(xs), *media)
  stacked = branches(params, count=3)
  prompts_ = sampling.Prompts(ids, mask, media)
  rollout = sampling.stacked_generate(one_device_run(cfg), stacked,
                                      sampling.Sampler(cfg, sampler(), G), prompts_,
                                      jax.random.split(jax.random.key(4), 3))
  beta = np.zeros((3, 4 * G), np.float32)
  beta[:, 2 * G:] = 0.5
  advantages = np.random.default_rng(5).normal(size=(3, 4 * G)).astype(np.float32)
  rows = rollout_lib.build_rows(prompts_, rollout, advantages, beta)
  assert rows.prompt_len == P
  assignment = np.array([[1, 2], [0, 0], [0, 0]], np.int32)  # hub = text
  routing = stages.teacher_routing(assignment, 3, samples=G, native_rows=2 * G)
  optimizer = __import__("optax").sgd(0.05)
  state = update_lib.init_optimizer_state(optimizer, stacked)
  u = ucfg(cfg)
  want = update_lib.update(update_lib.UpdateFn(one_device_run(u.model), u, optimizer),
                           update_lib.TrainState(stacked, state), rows,
                           scoring.Teachers(stacked, routing.as_arrays(), 2 * G))
  run = sharding.RunSharding(sharding.make_mesh(dict(expert=3, data=2, fsdp=1, tensor=1),
                                                jax.devices()[:6]),
                             param_axes=qwen3_vl.param_axes(cfg))
  fn = update_lib.update_program(update_lib.UpdateFn(run, u, optimizer))
  traces = update_traces(monkeypatch)
  placed = run.shard_params(stacked)
  host_rows = jax.tree.map(np.asarray, rows)
  host_routing = routing.as_tree()  # numpy, teacher_prompts a tuple (one per teacher)
  got = fn(update_lib.TrainState(placed, state), host_rows,
           scoring.Teachers(placed, host_routing, 2 * G), None)
  assert got[0].params["embed_tokens"]["embedding"].sharding.spec[0] == "expert"
  assert (np.asarray(want[1]["opd/tokens"]) > 0).all()
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(run.to_host(got))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=2e-5)
  fn(got[0], host_rows, scoring.Teachers(got[0].params, host_routing, 2 * G), None)
  assert len(traces) == 1  # one compile for two steps


def test_overlap_and_symmetric_kl_of_vl_rows_match_the_oracle(model, ref):
  """The branch diagnostics on Qwen3-VL rows (each prompt and its media run once, the
  states are the response columns) against whole-row forwards: top-10 overlap and
  symmetric KL of every student with every branch, on the student's own rows."""
  cfg, params = model
  stacked = branches(params, scale=0.05)
  rows = make_rows(cfg, ref, stacked)
  diag = diagnostics.pairwise_diagnostics(
      stacked, cfg, rows.tokens, rows.positions, rows.token_mask, rows.response_mask,
      rows.frames, kernel=ucfg(cfg).kernel, prompt_len=P)
  for s in range(2):
    rows_s = jax.tree.map(lambda x: x[s], rows)  # noqa: B023
    logp = [oracle_response_logp(jax.tree.map(lambda x: x[m], stacked), cfg, ref, s, rows_s)  # noqa: B023
            for m in range(2)]
    top = [np.argsort(-lp, axis=-1)[..., :10] for lp in logp]
    mask = np.asarray(rows_s.response_mask)[:, P - 1:-1]
    assert mask.sum() > 0
    for m in range(2):
      shared = (top[s][..., :, None] == top[m][..., None, :]).any(-1).sum(-1) / 10
      kl = lambda a, b: (np.exp(a) * (a - b)).sum(-1)  # noqa: E731
      sym = kl(logp[s], logp[m]) + kl(logp[m], logp[s])
      np.testing.assert_allclose(float(diag["overlap"][s, m]), (shared * mask).sum() / mask.sum(),
                                 atol=1e-6)
      np.testing.assert_allclose(float(diag["sym_kl"][s, m]), (sym * mask).sum() / mask.sum(),
                                 rtol=1e-3, atol=1e-5)
    assert float(diag["overlap"][s, 1 - s]) < 1.0  # the noisy branches disagree somewhere
