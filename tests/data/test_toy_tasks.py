"""Task suite: determinism, train/eval disjointness, correct worked solutions, rendered
pixels that agree with the labels, difficulty, validation, and host batching."""
import itertools

import numpy as np
import pytest

from copd_jax.data import examples as examples_lib, toy_flaws, toy_tasks as tasks
from copd_jax.data.answers import ANSWER_MARKER, reward
from copd_jax.data.tokenizer import ToyTokenizer

CAPS = tasks.CAPABILITIES
LEVELS = range(tasks.MAX_DIFFICULTY + 1)


def examples(cap, n, *, difficulty, seed=0, split="train", **kw):
  return [tasks.make_example(cap, i, seed=seed, difficulty=difficulty, split=split, **kw)
          for i in range(n)]


def same(a: examples_lib.Example, b: examples_lib.Example) -> bool:
  fields = (a.capability, a.question, a.answer, a.solution) == (
      b.capability, b.question, b.answer, b.solution)
  if a.frames is None or b.frames is None:
    return fields and a.frames is None and b.frames is None
  return fields and np.array_equal(a.frames, b.frames)


# --------------------------------------------------------------------- determinism

@pytest.mark.parametrize("cap", CAPS)
def test_make_example_is_deterministic(cap):
  for index in (0, 1, 17, 10**9):
    kw = dict(seed=5, difficulty=2, image_size=32, num_frames=4)
    a, b = tasks.make_example(cap, index, **kw), tasks.make_example(cap, index, **kw)
    assert same(a, b) and a.key() == b.key()


@pytest.mark.parametrize("cap", CAPS)
def test_seed_and_index_change_examples(cap):
  seed0 = {ex.key() for ex in examples(cap, 30, difficulty=2, seed=0)}
  seed1 = {ex.key() for ex in examples(cap, 30, difficulty=2, seed=1)}
  assert len(seed0) >= 25  # different indices give (nearly always) different content
  assert len(seed0 & seed1) <= 5


def test_streams_follow_make_example():
  stream = tasks.train_stream("video", seed=2, difficulty=1)
  for index, ex in enumerate(itertools.islice(stream, 5)):
    assert same(ex, tasks.make_example("video", index, seed=2, difficulty=1))
  later = next(tasks.train_stream("text", seed=2, difficulty=1, start=40))
  assert same(later, tasks.make_example("text", 40, seed=2, difficulty=1))
  held_out = tasks.eval_set("image", 4, seed=2, difficulty=1)
  assert all(same(ex, tasks.make_example("image", i, seed=2, difficulty=1, split="eval"))
             for i, ex in enumerate(held_out))


# ------------------------------------------------------------ train / eval split

@pytest.mark.parametrize("cap, difficulty", [("text", 0), ("text", 2), ("image", 0), ("video", 0)])
def test_eval_never_overlaps_train(cap, difficulty):
  # The smallest example spaces (text at difficulty 0 has ~300 questions) are where a
  # broken split would show first.
  train = list(itertools.islice(tasks.train_stream(cap, seed=0, difficulty=difficulty), 2000))
  held_out = tasks.eval_set(cap, 200, seed=0, difficulty=difficulty)
  assert {ex.key() for ex in train}.isdisjoint({ex.key() for ex in held_out})
  assert all(examples_lib.hash_bucket(ex) == examples_lib.EVAL_BUCKET for ex in held_out)
  assert all(examples_lib.hash_bucket(ex) != examples_lib.EVAL_BUCKET for ex in train)
  if cap == "text":  # text has no pixels: its questions themselves are held out
    assert {ex.question for ex in train}.isdisjoint({ex.question for ex in held_out})


@pytest.mark.parametrize("cap, difficulty", [("text", 0), ("text", 1), ("image", 1), ("video", 1)])
def test_train_validation_eval_are_disjoint(cap, difficulty):
  train = list(itertools.islice(tasks.train_stream(cap, seed=0, difficulty=difficulty), 2000))
  validation = tasks.validation_set(cap, 200, seed=0, difficulty=difficulty)
  held_out = tasks.eval_set(cap, 200, seed=0, difficulty=difficulty)
  keys = [{ex.key() for ex in split} for split in (train, validation, held_out)]
  assert keys[0].isdisjoint(keys[1]) and keys[0].isdisjoint(keys[2]) and keys[1].isdisjoint(keys[2])
  assert all(examples_lib.hash_bucket(ex) == examples_lib.VALIDATION_BUCKET for ex in validation)
  assert all(examples_lib.hash_bucket(ex) not in (examples_lib.EVAL_BUCKET, examples_lib.VALIDATION_BUCKET)
             for ex in train)
  if cap == "text":
    questions = [{ex.question for ex in split} for split in (train, validation, held_out)]
    assert questions[0].isdisjoint(questions[1]) and questions[1].isdisjoint(questions[2])
  # Pure: the same call gives the same examples.
  again = tasks.validation_set(cap, 200, seed=0, difficulty=difficulty)
  assert all(same(a, b) for a, b in zip(validation, again))


def test_eval_set_is_fixed_and_varied():
  a = tasks.eval_set("text", 50, seed=9, difficulty=2)
  b = tasks.eval_set("text", 50, seed=9, difficulty=2)
  assert all(same(x, y) for x, y in zip(a, b))
  assert len({ex.key() for ex in a}) >= 45


# -------------------------------------------------------------- solutions and traces

def left_to_right(expression: str) -> int:
  """'12+3-4' or '3*4' -> value, left to right (what the traces mean). No eval."""
  value, op, number = None, "+", ""
  for ch in expression + "+":
    if ch.isdigit():
      number += ch
      continue
    operand = int(number)
    value = operand if value is None else {"+": value + operand, "-": value - operand,
                                           "*": value * operand}[op]
    op, number = ch, ""
  return value


def check_trace(solution: str, answer: str) -> None:
  trace, marker, final = solution.rpartition(ANSWER_MARKER)
  assert marker and final == answer, solution
  equations = trace.split(";")
  for equation in equations:
    if "=" not in equation:  # a single counted term, e.g. '3#3'
      assert equation == answer, solution
      continue
    lhs, rhs = equation.split("=")
    assert left_to_right(lhs) == int(rhs), f"wrong arithmetic in {solution!r}"
  last = equations[-1]
  assert last.split("=")[-1] == answer, solution


@pytest.mark.parametrize("cap", CAPS)
def test_every_solution_is_correct_and_verifies(cap):
  tok = ToyTokenizer()
  for difficulty in LEVELS:
    for split in tasks.SPLITS:
      for ex in examples(cap, 60, difficulty=difficulty, seed=11, split=split):
        assert ex.capability == cap
        assert reward(ex.solution, ex.answer) == 1.0, ex.solution
        assert ex.answer == str(int(ex.answer)) and 0 <= int(ex.answer) < 100
        check_trace(ex.solution, ex.answer)
        tok.encode(ex.question), tok.encode(ex.solution)  # only known characters
        assert len(ex.question) <= 24


def test_shared_trace_format_across_capabilities():
  # The latent skill: every capability writes sums as 'a+b+...=s' before the answer.
  for cap in CAPS:
    solutions = [ex.solution for ex in examples(cap, 60, difficulty=1, seed=4)]
    assert any("+" in s and "=" in s for s in solutions), cap


# ------------------------------------------------------------ pixels match labels

def cell_colours(frame: np.ndarray) -> list[list[str | None]]:
  """frame: float32[H, W, 3] -> colour name (or None) of each 8x8 cell, by hue."""
  grid = frame.shape[0] // tasks.CELL_SIZE
  names = list(tasks.COLOURS)
  refs = np.array([np.array(rgb) / max(rgb) for rgb in tasks.COLOURS.values()])
  out = []
  for r in range(grid):
    row = []
    for c in range(grid):
      cell = frame[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].reshape(-1, 3)
      lit = cell[cell.max(axis=1) > 0]
      if len(lit) == 0:
        row.append(None)
        continue
      rgb = lit[0] / lit[0].max()
      row.append(names[int(np.argmin(np.abs(refs - rgb).sum(axis=1)))])
    out.append(row)
  return out


def colour_counts(frame) -> dict:
  counts = {}
  for name in itertools.chain.from_iterable(cell_colours(frame)):
    if name is not None:
      counts[name] = counts.get(name, 0) + 1
  return counts


def test_image_answers_match_pixels():
  checked = 0
  for difficulty in LEVELS:
    for ex in examples("image", 60, difficulty=difficulty, seed=21):
      assert ex.frames.shape == (1, 32, 32, 3) and ex.frames.dtype == np.float32
      assert 0.0 <= ex.frames.min() and ex.frames.max() <= 1.0
      counts = colour_counts(ex.frames[0])
      q = ex.question
      if q.startswith("how many "):
        expected = counts.get(q[len("how many "):-1], 0)
      elif q.startswith("more "):
        a, b = q[len("more "):-1].split(" than ")
        expected = counts.get(a, 0) - counts.get(b, 0)
      else:
        expected = sum(counts.get(name, 0) for name in q[:-2].split("+"))
      assert int(ex.answer) == expected, (q, counts)
      checked += 1
  assert checked == 240


def test_video_answers_match_pixels():
  kinds = set()
  for difficulty in LEVELS:
    for ex in examples("video", 60, difficulty=difficulty, seed=22, num_frames=4):
      assert ex.frames.shape == (4, 32, 32, 3)
      q = ex.question
      if q.endswith("dots in all?"):
        colour = q.split()[0] if q != "dots in all?" else None
        total = 0
        for frame in ex.frames:
          counts = colour_counts(frame)
          total += counts.get(colour, 0) if colour else sum(counts.values())
        if colour is None:  # one colour only: every lit cell is a dot to count
          assert len({n for f in ex.frames for n in colour_counts(f)}) <= 1
        assert int(ex.answer) == total, q
        kinds.add("dots")
      else:
        colour = q.split()[0]
        columns = [[c for row in cell_colours(f) for c, name in enumerate(row) if name == colour]
                   for f in ex.frames]
        assert all(len(cols) == 1 for cols in columns), q
        if "how far" in q:
          assert int(ex.answer) == abs(columns[-1][0] - columns[0][0]), q
          kinds.add("distance")
        else:
          assert int(ex.answer) == columns[-1][0], q
          kinds.add("end")
  assert kinds == {"dots", "distance", "end"}


def test_frames_are_read_only_and_keyed():
  ex = tasks.make_example("image", 0, seed=0, difficulty=1)
  with pytest.raises(ValueError):
    ex.frames[0, 0, 0, 0] = 1.0
  altered = np.array(ex.frames)
  altered[0, 0, 0, 0] += 0.5
  twin = examples_lib.Example(ex.capability, ex.question, ex.answer, ex.solution, altered)
  assert twin.key() != ex.key()
  assert tasks.make_example("text", 0, seed=0, difficulty=1).frames is None


# ---------------------------------------------------------------------- difficulty

def test_difficulty_changes_the_distribution():
  def mean(values):
    return float(np.mean(values))

  text_terms = [mean([sum(ch in "+-*," for ch in ex.question) + 1
                      for ex in examples("text", 150, difficulty=d)]) for d in LEVELS]
  assert text_terms[0] < text_terms[1] < text_terms[3]
  assert max(int(ex.answer) for ex in examples("text", 150, difficulty=0)) <= 18
  assert max(int(ex.answer) for ex in examples("text", 150, difficulty=2)) > 30

  objects = [mean([sum(colour_counts(ex.frames[0]).values())
                   for ex in examples("image", 80, difficulty=d)]) for d in LEVELS]
  assert objects == sorted(objects) and objects[3] > objects[0] + 3
  image_questions = [{ex.question.split()[0] for ex in examples("image", 80, difficulty=d)}
                     for d in (0, 3)]
  assert image_questions[0] == {"how"} and "more" in image_questions[1]

  video_lit = [mean([sum(sum(colour_counts(f).values()) for f in ex.frames)
                     for ex in examples("video", 80, difficulty=d)]) for d in (0, 3)]
  assert video_lit[1] > video_lit[0] + 2


def test_sizes_change_the_rendering():
  ex = tasks.make_example("video", 3, seed=0, difficulty=2, image_size=48, num_frames=6)
  assert ex.frames.shape == (6, 48, 48, 3)
  img = tasks.make_example("image", 3, seed=0, difficulty=0, image_size=64)  # counts only
  assert img.frames.shape == (1, 64, 64, 3)
  assert img.question.startswith("how many ")
  assert img.solution.count("+") == 7  # one counted term per grid row: 8 rows


# ---------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, field", [
    (dict(capability="audio"), "capability"),
    (dict(difficulty=-1), "difficulty"),
    (dict(difficulty=tasks.MAX_DIFFICULTY + 1), "difficulty"),
    (dict(difficulty=1.5), "difficulty"),
    (dict(difficulty=True), "difficulty"),
    (dict(image_size=36), "image_size"),
    (dict(image_size=16), "image_size"),
    (dict(num_frames=1), "num_frames"),
    (dict(num_frames=tasks.MAX_NUM_FRAMES + 1), "num_frames"),
    (dict(split="test"), "split"),
    (dict(index=-1), "index"),
    (dict(seed=-3), "seed"),
])
def test_make_example_validation(kwargs, field):
  args = dict(capability="image", index=0, seed=0, difficulty=1, image_size=32,
              num_frames=4, split="train")
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    tasks.make_example(args.pop("capability"), args.pop("index"), **args)


def test_stream_validation_is_eager():
  with pytest.raises(ValueError, match="difficulty"):
    tasks.train_stream("text", seed=0, difficulty=-1)
  with pytest.raises(ValueError, match="capability"):
    tasks.train_stream("speech", seed=0, difficulty=0)
  with pytest.raises(ValueError, match="n must"):
    tasks.eval_set("text", 0, seed=0, difficulty=0)
  bad_mixes = [({"audio": 1.0}, "weights key"), ({"text": -1.0}, r"weights\['text'\]"),
               ({"text": float("nan")}, r"weights\['text'\]"), ({"text": 0.0}, "positive"),
               ({}, "weights")]
  for weights, field in bad_mixes:
    with pytest.raises(ValueError, match=field):
      tasks.mixed_train_stream(weights, seed=0, difficulty=1)
  with pytest.raises(ValueError, match="needs an entry for 'image'"):
    tasks.mixed_train_stream({"text": 1, "image": 1}, seed=0, difficulty={"text": 1})
  with pytest.raises(ValueError, match=r"difficulty\['text'\]"):
    tasks.mixed_train_stream({"text": 1}, seed=0, difficulty={"text": 9})


def test_example_validation():
  with pytest.raises(ValueError, match="frames"):
    examples_lib.Example("text", "1+1=?", "2", "1+1=2#2", np.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="frames"):
    examples_lib.Example("image", "how many red?", "0", "0#0", None)
  with pytest.raises(ValueError, match="frames"):
    examples_lib.Example("image", "how many red?", "0", "0#0", np.zeros((8, 8, 3)))
  with pytest.raises(ValueError, match="capability"):
    examples_lib.Example("smell", "?", "0", "0#0")


# ---------------------------------------------------------------------- mixed stream

def test_mixed_stream_interleaves_train_streams_by_weight():
  weights = {"text": 3.0, "image": 1.0, "video": 0.0}
  mixed = list(itertools.islice(
      tasks.mixed_train_stream(weights, seed=4, difficulty={"text": 1, "image": 2}), 400))
  caps = [ex.capability for ex in mixed]
  assert "video" not in caps
  assert 0.65 < caps.count("text") / len(caps) < 0.85
  for cap, difficulty in (("text", 1), ("image", 2)):
    own = [ex for ex in mixed if ex.capability == cap][:10]
    assert all(same(ex, tasks.make_example(cap, i, seed=4, difficulty=difficulty))
               for i, ex in enumerate(own))
  again = list(itertools.islice(
      tasks.mixed_train_stream(weights, seed=4, difficulty={"text": 1, "image": 2}), 400))
  assert [ex.key() for ex in again] == [ex.key() for ex in mixed]


# -------------------------------------------------------------------------- batching

NV, F, S = 5, 4, 32  # vision tokens, frames, image size


@pytest.fixture(scope="module")
def tok():
  return ToyTokenizer()


@pytest.fixture(scope="module")
def mixed_examples():
  return [tasks.make_example(cap, i, seed=8, difficulty=2) for i in range(3) for cap in CAPS]


def test_encode_prompts_layout(tok, mixed_examples):
  P = 40
  batch = examples_lib.encode_prompts(mixed_examples, tok, max_prompt_len=P, num_vision_tokens=NV,
                               num_frames=F, image_size=S)
  B = len(mixed_examples)
  assert batch.tokens.shape == (B, P) and batch.tokens.dtype == np.int32
  assert batch.mask.shape == (B, P) and batch.mask.dtype == bool
  assert batch.frames.shape == (B, F, S, S, 3) and batch.frames.dtype == np.float32
  assert batch.capability_ids.dtype == np.int32
  assert batch.answers == [ex.answer for ex in mixed_examples]
  for row, ex in enumerate(mixed_examples):
    ids = batch.tokens[row]
    length = examples_lib.prompt_length(ex, tok, NV)
    assert batch.mask[row].sum() == length
    assert not batch.mask[row, :P - length].any() and batch.mask[row, P - length:].all()
    assert (ids[:P - length] == tok.pad_id).all()  # left padding
    assert ids[P - length] == tok.bos_id
    assert tok.decode(ids) == ex.question
    vision = NV if ex.capability != "text" else 0
    assert (ids == tok.image_id).sum() == vision
    assert (ids[P - length + 1:P - length + 1 + vision] == tok.image_id).all()
    assert batch.capability_ids[row] == CAPS.index(ex.capability)
    if ex.capability == "text":
      assert not batch.frames[row].any()
    elif ex.capability == "image":
      assert all(np.array_equal(batch.frames[row, f], ex.frames[0]) for f in range(F))
    else:
      np.testing.assert_array_equal(batch.frames[row], ex.frames)


def test_encode_sft_batch_alignment(tok, mixed_examples):
  P, R = 40, 24
  prompts = examples_lib.encode_prompts(mixed_examples, tok, max_prompt_len=P, num_vision_tokens=NV,
                                 num_frames=F, image_size=S)
  sft = examples_lib.encode_sft_batch(mixed_examples, tok, max_prompt_len=P, max_response_len=R,
                               num_vision_tokens=NV, num_frames=F, image_size=S)
  B = len(mixed_examples)
  assert sft["tokens"].shape == sft["mask"].shape == sft["loss_mask"].shape == (B, P + R)
  assert sft["loss_mask"].dtype == np.float32 and sft["tokens"].dtype == np.int32
  np.testing.assert_array_equal(sft["tokens"][:, :P], prompts.tokens)
  np.testing.assert_array_equal(sft["frames"], prompts.frames)
  np.testing.assert_array_equal(sft["capability_ids"], prompts.capability_ids)
  assert not sft["loss_mask"][:, -1].any()
  for row, ex in enumerate(mixed_examples):
    predicts = np.flatnonzero(sft["loss_mask"][row])  # positions t whose t+1 is a target
    targets = sft["tokens"][row, predicts + 1]
    assert predicts[0] == P - 1  # the last prompt token predicts the first response token
    assert np.array_equal(predicts, np.arange(P - 1, P - 1 + len(ex.solution) + 1))
    assert tok.decode(targets) == ex.solution and targets[-1] == tok.eos_id
    assert sft["mask"][row].sum() == examples_lib.prompt_length(ex, tok, NV) + len(ex.solution) + 1
    assert (sft["tokens"][row, predicts[-1] + 2:] == tok.pad_id).all()  # right padding


def test_max_lengths_fit_every_example(tok):
  for difficulty in LEVELS:
    P, R = tasks.max_lengths(CAPS, difficulty=difficulty, num_vision_tokens=NV)
    exs = [tasks.make_example(cap, i, seed=13, difficulty=difficulty)
           for cap in CAPS for i in range(60)]
    # Raises if any prompt or response were longer than the bound.
    examples_lib.encode_sft_batch(exs, tok, max_prompt_len=P, max_response_len=R,
                           num_vision_tokens=NV, num_frames=F, image_size=S)
    assert max(examples_lib.prompt_length(ex, tok, NV) for ex in exs) >= P - 2  # and tight
  text_only = tasks.max_lengths(["text"], difficulty=2, num_vision_tokens=100)
  assert text_only[0] < 30  # no vision placeholders in text prompts
  assert tasks.max_lengths(CAPS, difficulty=2, num_vision_tokens=32)[1] <= 24


def test_batching_errors_name_the_example(tok, mixed_examples):
  kw = dict(num_vision_tokens=NV, num_frames=F, image_size=S)
  with pytest.raises(ValueError, match=r"examples\[1\].*max_prompt_len"):
    examples_lib.encode_prompts(mixed_examples, tok, max_prompt_len=12, **kw)
  with pytest.raises(ValueError, match=r"examples\[\d\].*max_response_len"):
    examples_lib.encode_sft_batch(mixed_examples, tok, max_prompt_len=40, max_response_len=4, **kw)
  big = tasks.make_example("video", 0, seed=0, difficulty=0, image_size=64)
  with pytest.raises(ValueError, match=r"examples\[0\].*frames of shape"):
    examples_lib.encode_prompts([big], tok, max_prompt_len=40, **kw)
  with pytest.raises(ValueError, match="num_vision_tokens"):
    examples_lib.encode_prompts(mixed_examples, tok, max_prompt_len=40, num_vision_tokens=0,
                         num_frames=F, image_size=S)
  with pytest.raises(ValueError, match="non-empty"):
    examples_lib.encode_prompts([], tok, max_prompt_len=40, **kw)
  with pytest.raises(ValueError, match="max_prompt_len"):
    examples_lib.encode_prompts(mixed_examples, tok, max_prompt_len=0, **kw)


# ------------------------------------------------------------ flawed demonstrations

def _with_solution(cap, solution, answer):
  frames = None if cap == "text" else np.zeros((1 if cap == "image" else 4, 32, 32, 3), np.float32)
  return examples_lib.Example(cap, "q?", answer, solution, frames)


@pytest.mark.parametrize("cap,solution,answer,flawed", [
    # text: every subtraction written as an addition, values carried through the steps
    ("text", "20-7=13;13+2=15#15", "15", "20+7=27;27+2=29#29"),
    ("text", "3*4=12;12-5=7#7", "7", "3*4=12;12+5=17#17"),
    ("text", "12+6+16=34#34", "34", "12+6+16=34#34"),  # nothing to slip
    # image: the last term of the count / sum is dropped
    ("image", "1+0+2+1=4#4", "4", "1+0+2=3#3"),
    ("image", "3+1=4#4", "4", "3#3"),
    ("image", "3-2=1#1", "1", "3#3"),
    # video: the last term (last frame / move) is counted twice, same operator
    ("video", "1+0+3+2=6#6", "6", "1+0+3+2+2=8#8"),
    ("video", "3-1-0-1=1#1", "1", "3-1-0-1-1=0#0"),
    ("video", "0+0+1=1#1", "1", "0+0+1+1=2#2"),
])
def test_flawed_solution_by_hand(cap, solution, answer, flawed):
  assert toy_flaws.flawed_solution(_with_solution(cap, solution, answer)) == flawed


@pytest.mark.parametrize("cap", CAPS)
def test_flawed_solutions_are_consistent_and_fit(cap):
  # The flawed trace is arithmetic done right on the wrong procedure: every equation
  # holds and the answer is the last result; and it fits the toy configs' response
  # budget (solution + eos).
  from copd_jax import default_config
  longest = default_config.skeleton().data.max_response_len - 1
  changed = 0
  for ex in examples(cap, 300, difficulty=2, seed=3):
    flawed = toy_flaws.flawed_solution(ex)
    trace, answer = flawed.rsplit(ANSWER_MARKER, 1)
    for equation in trace.split(";"):
      if "=" in equation:
        lhs, rhs = equation.split("=")
        terms, ops = toy_flaws._parse_equation(lhs)
        assert toy_flaws._apply_ops(terms, ops) == int(rhs), flawed
    assert answer == (trace.split(";")[-1].split("=")[-1])
    assert len(flawed) <= longest
    changed += reward(flawed, ex.answer) == 0
  assert 0.3 < changed / 300 < 0.9  # the flaw usually, not always, changes the answer


def test_with_flawed_demonstrations_rate_and_determinism():
  stream = lambda: tasks.mixed_train_stream({"text": 1, "image": 1}, seed=2, difficulty=1)
  rates = {"text": 0.5, "image": 0.0}
  a = list(itertools.islice(toy_flaws.with_flawed_demonstrations(stream(), rates, seed=4), 400))
  b = list(itertools.islice(toy_flaws.with_flawed_demonstrations(stream(), rates, seed=4), 400))
  plain = list(itertools.islice(stream(), 400))
  assert [x.solution for x in a] == [x.solution for x in b]
  # Questions and answers are untouched; image (rate 0) keeps every solution.
  assert [(x.question, x.answer) for x in a] == [(x.question, x.answer) for x in plain]
  assert all(x.solution == p.solution for x, p in zip(a, plain) if x.capability == "image")
  text = [(x, p) for x, p in zip(a, plain) if x.capability == "text"]
  flawed = [x.solution == toy_flaws.flawed_solution(p) != p.solution for x, p in text]
  could = [toy_flaws.flawed_solution(p) != p.solution for _, p in text]
  assert 0.35 < sum(flawed) / sum(could) < 0.65
  with pytest.raises(ValueError, match=r"flaw_rate\['text'\]"):
    next(toy_flaws.with_flawed_demonstrations(stream(), {"text": 1.5}, seed=0))
