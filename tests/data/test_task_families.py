"""The twelve capability families and the divergence dial (copd_jax/data/toy_tasks.py):
the original three keep their items, every family is pure, split-disjoint and verifiable,
its flaw is a wrong procedure the verifier rejects, and in the conflict setting the
one-letter cue alone decides the answer."""
import itertools
import re

import numpy as np
import pytest

from copd_jax import config_lib, default_config
from copd_jax.data import examples as examples_lib, toy_flaws, toy_tasks as tasks
from copd_jax.data.answers import ANSWER_MARKER, reward
from copd_jax.data.tokenizer import ToyTokenizer

NEW = tuple(f for f in tasks.FAMILY_NAMES if f not in tasks.CAPABILITIES)
LEVELS = range(tasks.MAX_DIFFICULTY + 1)


def items(cap, n, *, difficulty=1, seed=0, split="train", conflict=0.0):
  return [tasks.make_example(cap, i, seed=seed, difficulty=difficulty, split=split,
                             conflict=conflict) for i in range(n)]


# ------------------------------------------------------ the original three are unchanged

# Items of the generator as it was before the families became data (commit 6fb5b1b):
# (family, index, seed, difficulty, split) -> question, solution, content hash, flawed.
PINNED = [
    ("text", 0, 1234, 1, "train", "had 9,lost 3,got 1?", "9-3=6;6+1=7#7",
     "a74ce7de9535ff21bbe702ab4e5b5c75", "9+3=12;12+1=13#13"),
    ("text", 7, 0, 2, "eval", "had 19,lost 18,got 13?", "19-18=1;1+13=14#14",
     "01e955588d934773de154ed71415078c", "19+18=37;37+13=50#50"),
    ("image", 3, 1234, 1, "validation", "how many green?", "1+0+0+0=1#1",
     "6b6e29b96fa93d20016248a488eff716", "1+0+0=1#1"),
    ("image", 0, 5, 3, "train", "how many green?", "0+2+1+0=3#3",
     "33097273e0e5cd81bb80e66d5d00fc18", "0+2+1=3#3"),
    ("video", 2, 1234, 1, "eval", "green end column?", "1+0+1+0=2#2",
     "de9d92d8d3ba77f90f26db5e6ff5b028", "1+0+1+0+0=2#2"),
    ("video", 11, 9, 0, "train", "blue moved how far?", "1+0+1=2#2",
     "062bb7e4028827ce20070ec469f1c827", "1+0+1+1=3#3"),
]


@pytest.mark.parametrize("cap, index, seed, difficulty, split, question, solution, key, flawed",
                         PINNED)
@pytest.mark.parametrize("conflict", [0.0, 1.0])  # the dial never touches these families
def test_original_items_are_pinned(cap, index, seed, difficulty, split, question, solution,
                                   key, flawed, conflict):
  ex = tasks.make_example(cap, index, seed=seed, difficulty=difficulty, split=split,
                          conflict=conflict)
  assert (ex.question, ex.solution, ex.key()) == (question, solution, key)
  assert toy_flaws.flawed_solution(ex) == flawed


def test_original_sft_stream_is_pinned():
  # The base's demonstrations (mixture + flaws) of the committed results, first 120.
  import hashlib
  stream = toy_flaws.with_flawed_demonstrations(
      tasks.mixed_train_stream({"text": 1.0, "image": 1.0, "video": 1.0}, seed=1234,
                               difficulty=1, conflict=tasks.SFT_CONFLICT),
      {"text": 0.7, "image": 0.7, "video": 0.7}, seed=1234)
  digest = hashlib.sha256()
  for ex in itertools.islice(stream, 120):
    digest.update((ex.key() + ex.solution).encode())
  assert digest.hexdigest()[:32] == "3cb475a7f63401f65f99e354c9faabcb"


# --------------------------------------------------------------------- the registry

def test_twelve_families_each_with_its_own_flaw():
  assert len(tasks.FAMILY_NAMES) == 12
  assert tasks.FAMILY_NAMES[:3] == tasks.CAPABILITIES
  kinds = [toy_flaws.FLAW_KINDS[f] for f in tasks.FAMILY_NAMES]
  assert len(set(kinds)) == 12 and toy_flaws.TWIN_FLAW not in kinds
  for family in tasks.FAMILIES.values():
    assert family.cue and family.procedure and family.flaw
  assert tasks.CONFLICT_FAMILIES == ("total", "remain")
  assert tasks.FAMILIES["total"].twin == "remain" and tasks.FAMILIES["remain"].twin == "total"


# ------------------------------------------------------------- purity and the splits

@pytest.mark.parametrize("cap", NEW)
def test_new_families_are_pure_and_varied(cap):
  for index in (0, 5, 10**9):
    kw = dict(seed=3, difficulty=2, split="eval", conflict=0.5)
    a, b = tasks.make_example(cap, index, **kw), tasks.make_example(cap, index, **kw)
    assert (a.question, a.solution, a.key()) == (b.question, b.solution, b.key())
  seed0 = [ex.key() for ex in items(cap, 40, difficulty=2)]
  seed1 = [ex.key() for ex in items(cap, 40, difficulty=2, seed=1)]
  assert len(set(seed0)) >= 20  # mul at difficulty 2 has the smallest space (~60 items)
  assert sum(a == b for a, b in zip(seed0, seed1)) <= 5  # another seed, another stream
  stream = tasks.train_stream(cap, seed=2, difficulty=1, conflict=0.5)
  for index, ex in enumerate(itertools.islice(stream, 4)):
    assert ex.key() == tasks.make_example(cap, index, seed=2, difficulty=1, conflict=0.5).key()


@pytest.mark.parametrize("cap", NEW)
@pytest.mark.parametrize("conflict", [0.0, 1.0])
def test_new_families_splits_are_disjoint(cap, conflict):
  # Difficulty 0: the smallest spaces, where a broken split would show first.
  for difficulty in (0, 1):
    train = items(cap, 1500, difficulty=difficulty, conflict=conflict)
    validation = items(cap, 150, difficulty=difficulty, split="validation", conflict=conflict)
    held_out = items(cap, 150, difficulty=difficulty, split="eval", conflict=conflict)
    questions = [{ex.question for ex in s} for s in (train, validation, held_out)]
    # Text items: the question decides the content, so questions themselves are held out.
    assert questions[0].isdisjoint(questions[1]) and questions[0].isdisjoint(questions[2])
    assert questions[1].isdisjoint(questions[2])
    assert all(examples_lib.hash_bucket(ex) == examples_lib.EVAL_BUCKET for ex in held_out)
    assert all(examples_lib.hash_bucket(ex) == examples_lib.VALIDATION_BUCKET for ex in validation)


# ------------------------------------------- solutions: an independent oracle per family

def oracle(cap: str, question: str) -> int:
  """The answer read from the question alone, by a different route than the generator."""
  body = question.rstrip("?")
  numbers = [int(x) for x in re.findall(r"\d+", body)]
  if cap == "total" or (cap in ("total", "remain") and body.startswith("t:")):
    return sum(numbers)
  if cap == "remain":
    return numbers[0] - sum(numbers[1:])
  if cap == "max":
    return max(numbers)
  if cap == "mul":  # 'a times b' or 'a times b plus c'
    return numbers[0] * numbers[1] + sum(numbers[2:])
  if cap == "digits":
    return sum(int(d) for d in body.split()[-1])
  if cap == "count":
    letter, word = body.split(" in ")
    return word.count(letter)
  if cap == "gap":
    return abs(numbers[0] - numbers[1])
  if cap == "next":
    return numbers[-1] + (numbers[1] - numbers[0])
  if cap == "mean":
    return sum(numbers) // len(numbers)
  raise AssertionError(cap)


@pytest.mark.parametrize("cap", NEW)
def test_new_family_answers_match_an_oracle_and_verify(cap):
  tok = ToyTokenizer()
  for difficulty in LEVELS:
    for split in tasks.SPLITS:
      for ex in items(cap, 40, difficulty=difficulty, seed=11, split=split, conflict=0.5):
        assert ex.capability == cap and ex.modality == "text" and ex.frames is None
        assert int(ex.answer) == oracle(cap, ex.question), ex.question
        assert 0 <= int(ex.answer) < 100 and ex.answer == str(int(ex.answer))
        assert reward(ex.solution, ex.answer) == 1.0
        assert ex.solution.endswith(f"{ANSWER_MARKER}{ex.answer}")
        tok.encode(ex.question), tok.encode(ex.solution)
        assert len(ex.question) <= 24


# Hand-written flawed procedures, one per new family (and the twin in the shared form).
@pytest.mark.parametrize("cap, question, solution, answer, flawed", [
    ("total", "add up 40,3,2?", "40+3=43;43+2=45#45", "45", "3+2=5#5"),
    ("remain", "from 40 take 3,2?", "40-3=37;37-2=35#35", "35", "40-2=38#38"),
    ("total", "t:40,3,2?", "40+3=43;43+2=45#45", "45", "40-3=37;37-2=35#35"),
    ("remain", "r:40,3,2?", "40-3=37;37-2=35#35", "35", "40+3=43;43+2=45#45"),
    ("total", "t:40,3?", "40+3=43#43", "43", "40-3=37#37"),  # difficulty 0: two numbers
    ("max", "max 3,8,5?", "3<8;8>5#8", "8", "3<8;3<5#3"),
    ("max", "max 9,2,4,7?", "9>2;9>4;9>7#9", "9", "9>2;2<4;2<7#2"),
    ("mul", "7 times 8?", "7*8=56#56", "56", "7*7=49#49"),
    ("mul", "7 times 8 plus 3?", "7*8=56;56+3=59#59", "59", "7*7=49;49+3=52#52"),
    ("digits", "digit sum 472?", "4+7+2=13#13", "13", "1+1+1=3#3"),
    ("count", "a in abaca?", "1+0+1+0+1=3#3", "3", "0+1+0+1+0=2#2"),
    ("gap", "gap 3,11?", "11-3=8#8", "8", "11-3-1=7#7"),
    ("next", "next 2,5,8?", "5-2=3;8+3=11#11", "11", "8+2=10#10"),
    ("mean", "mean 4,8?", "4+8=12;12/2=6#6", "6", "4+8=12#12"),
])
def test_flawed_procedures_by_hand(cap, question, solution, answer, flawed):
  ex = examples_lib.Example(cap, question, answer, solution, modality="text")
  assert toy_flaws.flawed_solution(ex) == flawed
  assert reward(flawed, answer) == 0.0 and reward(solution, answer) == 1.0


@pytest.mark.parametrize("cap", NEW)
def test_verifier_accepts_the_procedure_and_rejects_the_flaw(cap):
  longest = default_config.skeleton().data.max_response_len - 1
  rejected = 0
  exs = items(cap, 200, difficulty=1, seed=3, conflict=0.5)
  for ex in exs:
    flawed = toy_flaws.flawed_solution(ex)
    assert reward(ex.solution, ex.answer) == 1.0
    assert len(flawed) <= longest and len(ex.solution) <= longest
    # The flawed trace is a consistent procedure: its own answer follows from it.
    assert flawed.rsplit(ANSWER_MARKER, 1)[1] == flawed.rsplit(ANSWER_MARKER, 1)[1].strip()
    rejected += reward(flawed, ex.answer) == 0.0
  assert rejected / len(exs) > 0.8  # each flaw nearly always changes the answer


# ------------------------------------------------------------------ the conflict dial

def test_conflict_sets_the_share_of_shared_forms():
  for cap in tasks.CONFLICT_FAMILIES:
    for conflict, low, high in ((0.0, 0, 0), (0.5, 0.4, 0.6), (1.0, 1, 1)):
      share = np.mean([tasks.is_shared_form(ex) for ex in items(cap, 300, conflict=conflict)])
      assert low <= share <= high, (cap, conflict, share)
  # Levels are coupled item by item: an item shared at 0.3 is shared at 0.6 too.
  low = [tasks.is_shared_form(ex) for ex in items("total", 300, conflict=0.3)]
  high = [tasks.is_shared_form(ex) for ex in items("total", 300, conflict=0.6)]
  assert all(h for l, h in zip(low, high) if l)
  # Other families ignore the dial.
  assert [ex.key() for ex in items("max", 20, conflict=1.0)] == [ex.key() for ex in items("max", 20)]


def test_shared_form_cue_alone_decides_the_answer():
  # The two families' shared-form items draw from one problem distribution and differ
  # only in the cue letter; the cue flips the procedure, so the same numbers have two
  # answers, and each family's correct solution is the other's flaw.
  totals = items("total", 200, conflict=1.0)
  remains = items("remain", 200, conflict=1.0)
  assert all(ex.question.startswith("t:") for ex in totals)
  assert all(ex.question.startswith("r:") for ex in remains)
  strip = lambda q: q[2:]
  shared_bodies = {strip(ex.question) for ex in totals} & {strip(ex.question) for ex in remains}
  assert shared_bodies  # the same surface (bar the cue) occurs in both families
  for ex in totals + remains:
    twin_cue = tasks.FAMILIES[tasks.FAMILIES[ex.capability].twin].shared_cue
    twin = examples_lib.Example(tasks.FAMILIES[ex.capability].twin, twin_cue + ex.question[1:],
                                str(oracle(tasks.FAMILIES[ex.capability].twin,
                                           twin_cue + ex.question[1:])),
                                toy_flaws.flawed_solution(ex), modality="text")
    assert reward(twin.solution, twin.answer) == 1.0  # my flaw is my twin's procedure
    assert reward(ex.solution, twin.answer) == 0.0 or ex.answer == twin.answer
    assert toy_flaws.flawed_solution(twin) == ex.solution  # and the other way round
  differ = np.mean([oracle("total", ex.question) != oracle("remain", "r" + ex.question[1:])
                    for ex in totals])
  assert differ > 0.9  # the cue changes the answer unless every other number is 0


def test_shared_form_problem_fits_both_procedures():
  for ex in items("total", 200, difficulty=3, conflict=1.0) + items("remain", 200, difficulty=3,
                                                                     conflict=1.0):
    numbers = [int(x) for x in re.findall(r"\d+", ex.question)]
    assert numbers[0] >= sum(numbers[1:]) and sum(numbers) <= 99


def test_sft_demonstrations_ignore_the_cue_at_half_flaw_rate():
  # At flaw rate 0.5 the base's shared-form demonstrations add as often under 't:' as
  # under 'r:': the cue carries no information about the procedure it is shown.
  stream = toy_flaws.with_flawed_demonstrations(
      tasks.mixed_train_stream({"total": 1.0, "remain": 1.0}, seed=0, difficulty=1,
                               conflict=tasks.SFT_CONFLICT), {"total": 0.5, "remain": 0.5}, seed=0)
  adds = {"t": [], "r": []}
  for ex in itertools.islice(stream, 2000):
    if tasks.is_shared_form(ex):
      trace = ex.solution.split(ANSWER_MARKER)[0]
      if trace.count("+") or trace.count("-"):
        adds[ex.question[0]].append("+" in trace)
  assert min(len(v) for v in adds.values()) > 300
  assert abs(np.mean(adds["t"]) - 0.5) < 0.06 and abs(np.mean(adds["r"]) - 0.5) < 0.06


# -------------------------------------------------------------- lengths and config

def test_max_lengths_bound_every_family():
  tok = ToyTokenizer()
  for difficulty in LEVELS:
    for cap in NEW:
      question, solution = tasks.max_text_chars(cap, difficulty)
      exs = items(cap, 200, difficulty=difficulty, seed=13, conflict=0.5)
      longest_q = max(len(ex.question) for ex in exs)
      longest_s = max(max(len(ex.solution), len(toy_flaws.flawed_solution(ex))) for ex in exs)
      assert longest_q <= question and longest_s <= solution, (cap, difficulty)
      assert question - longest_q <= 4 and solution - longest_s <= 4, (cap, difficulty)  # tight
  prompt, response = tasks.max_lengths(tasks.FAMILY_NAMES, difficulty=1, num_vision_tokens=32)
  assert response <= 24  # the toy configs' response budget holds all twelve
  assert tasks.max_lengths(NEW, difficulty=1, num_vision_tokens=32)[0] <= 25  # no vision tokens


def test_config_accepts_families_and_checks_the_dial():
  cfg = default_config.get("copd", "micro")
  caps = ("total", "remain", "max")
  cfg.tasks.capabilities = caps
  cfg.tasks.difficulty = {c: 1 for c in caps}
  cfg.warm_start.mix = {c: 1.0 for c in caps}
  cfg.warm_start.flaw_rate = {c: 0.5 for c in caps}
  cfg.rl.capabilities = caps
  cfg.rl.opd.hub = "total"
  cfg.num_experts = 3
  cfg.data.conflict = 0.5
  config_lib.validate_config(cfg)
  for bad in (1.5, -0.1, float("nan")):
    cfg.data.conflict = bad
    with pytest.raises(ValueError, match="data.conflict"):
      config_lib.validate_config(cfg)
  with pytest.raises(ValueError, match="conflict"):
    tasks.make_example("total", 0, seed=0, difficulty=1, conflict=2.0)
  with pytest.raises(ValueError, match="families"):
    tasks.make_example("speech", 0, seed=0, difficulty=1)


def test_tfds_static_split_of_a_new_family(tmp_path):
  tfds_tasks = pytest.importorskip("copd_jax.data.tfds_tasks")
  name = tfds_tasks.write_static_split(tmp_path, "mean", difficulty=1, seed=5, num_train=6,
                                       num_eval=3)
  for split, n in (("train", 6), ("eval", 3)):
    source = tfds_tasks.load_static_split(tmp_path, "mean", split, config=name)
    ref = [tasks.make_example("mean", i, seed=5, difficulty=1, split=split) for i in range(n)]
    got = [source[i] for i in range(n)]
    assert [ex.key() for ex in got] == [ex.key() for ex in ref]
    assert all(ex.modality == "text" and ex.frames is None for ex in got)
