"""The procedural toy task suite: twelve capability families, and a divergence dial.

The original three capabilities need their own perception -- text only, one rendered
image, a short clip of frames -- but every worked solution ends in the same arithmetic
trace format, so what one branch learns about adding and subtracting small numbers can
help another (the paper's cross-capability transfer):

  text   "had 5,got 3,lost 2?"   -> "5+3=8;8-2=6#6"
  image  "how many red?"         -> "1+0+2+0=3#3"   (red shapes per grid row)
  video  "dots in all?"          -> "1+0+2+1=4#4"   (dots per frame)

Families as data. A capability family is a `Family` spec (FAMILIES): the cue its prompts
carry, its correct procedure, its flawed procedure (implemented in toy_flaws.FLAW_KINDS)
and a generator. Nine text families join the three, each with a procedure and a flaw of
its own (copd_jax/data/text_families.py holds them and the text capability's generator), so up to twelve branches can each
learn something different.

The original three keep exactly their items for every seed (their RNG keys, draws and
content hashes are unchanged; tests pin some), so committed results stay reproducible.

Conflict: the divergence dial (`conflict`, config.data.conflict, in [0, 1]) makes total
and remain conflict on prompts that look alike; text_families.py explains it.

Generators are pure functions of (family, index, seed, difficulty, sizes, split,
conflict): `make_example` is random access, so grain can wrap it as a MapDataset source.
Train, validation and eval partition the example space by content hash (eval keeps
bucket 0, validation bucket 1, train the other six), so no two splits can share an
example. Hyper-parameters are chosen on validation; results are reported on eval.

The base policy is SFT'd on worked solutions some of which show a flawed procedure (see
toy_flaws): RL's job on this suite is to make the base prefer the right procedure, which
it can sample but does not choose greedily.

Images are `image_size` square, a grid of 8x8 cells aligned with 8x8 ViT patches; each
object fills one cell. Character lengths are token lengths under ToyTokenizer;
`max_lengths` gives the worst case per difficulty (question <= 24 chars everywhere;
solution <= 23 chars up to difficulty 2 at the default sizes).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from copd_jax.data.task_traces import (  # noqa: F401  (chain/sum/step traces: public here too)
    _digits, _int, _solution, _solution_chars, _sum_trace_chars,
    chain_trace, step_trace, sum_trace)
from copd_jax.data.text_families import (  # noqa: F401  (compare_trace: public here too)
    _MAX_WORD_TERMS, _TEXT_LEVELS, REMAIN_CUE, TOTAL_CUE, _TEXT_FAMILY_CHARS, _make_count,
    _make_text, _make_digits, _make_gap, _make_max,
    _make_mean, _make_mul, _make_next, _make_remain, _make_total, compare_trace)
from copd_jax.data.examples import (
  CAPABILITIES,
  SPLIT_BUCKETS,
  SPLITS,
  Example,
  _check_int,
  hash_bucket,
)

MAX_DIFFICULTY = 3
CELL_SIZE = 8  # pixels per grid cell = the ViT patch size the images are drawn for
MIN_IMAGE_SIZE = 32  # a 4x4 grid: room for the 10 objects of the hardest image level
MAX_NUM_FRAMES = 9  # per-frame traces stay short


COLOURS = {  # name -> RGB in [0, 1]
    "red": (1.0, 0.15, 0.1),
    "green": (0.1, 0.9, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}


COLOUR_NAMES = tuple(COLOURS)


def _shape_masks() -> dict[str, np.ndarray]:
  """bool[CELL_SIZE, CELL_SIZE] per shape, each clearly different inside one patch."""
  square = np.zeros((CELL_SIZE, CELL_SIZE), bool)
  square[1:7, 1:7] = True
  dot = np.zeros((CELL_SIZE, CELL_SIZE), bool)
  dot[2:6, 3:5] = dot[3:5, 2:6] = True
  cross = np.zeros((CELL_SIZE, CELL_SIZE), bool)
  cross[3:5, 0:8] = cross[0:8, 3:5] = True
  return {"square": square, "dot": dot, "cross": cross}


SHAPE_MASKS = _shape_masks()
SHAPE_NAMES = tuple(SHAPE_MASKS)


def _check_capability(capability: str, field: str = "capability") -> None:
  if capability not in FAMILIES:
    raise ValueError(f"{field} must be one of the task families {FAMILY_NAMES}, got "
                     f"{capability!r}")


def _check_conflict(conflict) -> float:
  if (isinstance(conflict, bool) or not isinstance(conflict, numbers.Real)
      or not 0.0 <= float(conflict) <= 1.0):
    raise ValueError(f"conflict must be a number in [0, 1], got {conflict!r}")
  return float(conflict)


def _check_generator_args(capability, difficulty, image_size, num_frames, conflict=0.0) -> None:
  _check_capability(capability)
  _check_conflict(conflict)
  _check_int("difficulty", difficulty, 0, MAX_DIFFICULTY)
  _check_int("image_size", image_size, MIN_IMAGE_SIZE)
  if image_size % CELL_SIZE:
    raise ValueError(f"image_size must be a multiple of {CELL_SIZE} (the cell/patch "
                     f"size), got {image_size}")
  _check_int("num_frames", num_frames, 2, MAX_NUM_FRAMES)



def _blank_frames(num_frames: int, image_size: int) -> np.ndarray:
  return np.zeros((num_frames, image_size, image_size, 3), np.float32)


def _draw(frame: np.ndarray, row: int, col: int, shape: str, colour: str,
          brightness: float) -> None:
  """Paints one shape into grid cell (row, col) of frame: float32[H, W, 3], in place."""
  cell = frame[row * CELL_SIZE:(row + 1) * CELL_SIZE, col * CELL_SIZE:(col + 1) * CELL_SIZE]
  cell[SHAPE_MASKS[shape]] = np.asarray(COLOURS[colour], np.float32) * brightness


def _brightness(rng: np.random.Generator) -> float:
  return float(rng.uniform(0.75, 1.0))  # small jitter: colour, not exact value, matters


@dataclasses.dataclass(frozen=True)
class _ImageLevel:
  num_colours: int  # colours present in the picture
  min_objects: int
  max_objects: int
  kinds: tuple[str, ...]  # question kinds drawn uniformly
  mixed_shapes: bool


_IMAGE_LEVELS = {
    0: _ImageLevel(2, 1, 4, ("count",), False),
    1: _ImageLevel(3, 2, 6, ("count", "sum2"), True),
    2: _ImageLevel(4, 3, 8, ("count", "sum2", "more"), True),
    3: _ImageLevel(4, 4, 10, ("count", "sum2", "sum3", "more"), True),
}


def _make_image(rng: np.random.Generator, difficulty: int,
                image_size: int) -> tuple[str, str, int, np.ndarray]:
  """-> (question, solution, answer, frames float32[1, H, W, 3])."""
  level = _IMAGE_LEVELS[difficulty]
  grid = image_size // CELL_SIZE
  palette = [COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES), level.num_colours,
                                                 replace=False)]
  num_objects = _int(rng, level.min_objects, level.max_objects)
  frames = _blank_frames(1, image_size)
  row_counts = {colour: [0] * grid for colour in palette}
  for cell in rng.choice(grid * grid, num_objects, replace=False):
    row, col = divmod(int(cell), grid)
    colour = palette[_int(rng, 0, len(palette) - 1)]
    shape = SHAPE_NAMES[_int(rng, 0, len(SHAPE_NAMES) - 1)] if level.mixed_shapes else "square"
    _draw(frames[0], row, col, shape, colour, _brightness(rng))
    row_counts[colour][row] += 1
  count = {colour: sum(rows) for colour, rows in row_counts.items()}

  kind = level.kinds[_int(rng, 0, len(level.kinds) - 1)]
  if kind == "count":
    colour = palette[_int(rng, 0, len(palette) - 1)]
    # Counting row by row writes the count as a sum -- the shared arithmetic format.
    question, trace, answer = (f"how many {colour}?", sum_trace(row_counts[colour]),
                               count[colour])
  elif kind in ("sum2", "sum3"):
    names = [palette[i] for i in rng.choice(len(palette), int(kind[-1]), replace=False)]
    terms = [count[name] for name in names]
    question, trace, answer = "+".join(names) + "=?", sum_trace(terms), sum(terms)
  else:  # "more": how many more a than b, named so that the answer is >= 0
    a, b = (palette[i] for i in rng.choice(len(palette), 2, replace=False))
    if count[a] < count[b]:
      a, b = b, a
    question = f"more {a} than {b}?"
    trace, answer = chain_trace(count[a], "-", [count[b]]), count[a] - count[b]
  return question, _solution(trace, answer), answer, frames


@dataclasses.dataclass(frozen=True)
class _VideoLevel:
  max_dots: int  # target-colour dots per frame ("events")
  distractor_colours: int  # other-colour dots per frame (0..2 each); > 0 names the colour
  max_step: int  # columns a mover may move between consecutive frames
  movers: int  # objects that move (each in its own row)
  statics: int  # objects that stay put
  kinds: tuple[str, ...]


_VIDEO_LEVELS = {
    0: _VideoLevel(2, 0, 1, 1, 0, ("dots", "distance")),
    1: _VideoLevel(3, 0, 1, 1, 1, ("dots", "distance", "end")),
    2: _VideoLevel(3, 1, 1, 2, 0, ("dots", "distance", "end")),
    3: _VideoLevel(4, 2, 2, 2, 1, ("dots", "distance", "end")),
}


_MAX_DISTRACTOR_DOTS = 2


def _video_dots(rng, level: _VideoLevel, frames: np.ndarray, grid: int) -> tuple[str, str, int]:
  """Dots appear per frame; count the target-colour ones over the whole clip."""
  colours = [COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES),
                                                 1 + level.distractor_colours, replace=False)]
  per_frame = []
  for frame in frames:
    counts = [_int(rng, 0, level.max_dots)]
    counts += [_int(rng, 0, _MAX_DISTRACTOR_DOTS) for _ in colours[1:]]
    cells = rng.choice(grid * grid, sum(counts), replace=False)
    owners = [colour for colour, n in zip(colours, counts) for _ in range(n)]
    for cell, colour in zip(cells, owners):
      row, col = divmod(int(cell), grid)
      _draw(frame, row, col, "dot", colour, _brightness(rng))
    per_frame.append(counts[0])
  question = "dots in all?" if level.distractor_colours == 0 else f"{colours[0]} dots in all?"
  return question, _solution(sum_trace(per_frame), sum(per_frame)), sum(per_frame)


def _mover_steps(rng, num_moves: int, max_step: int, budget: int) -> list[int]:
  """num_moves step sizes in [0, max_step] summing to <= budget (stays in the grid)."""
  steps = []
  for _ in range(num_moves):
    steps.append(_int(rng, 0, min(max_step, budget - sum(steps))))
  return [steps[i] for i in rng.permutation(num_moves)]  # no bias toward early moves


def _video_motion(rng, level: _VideoLevel, frames: np.ndarray, grid: int,
                  kind: str) -> tuple[str, str, int]:
  """Movers slide horizontally, each in one direction; ask how far / where one ended."""
  num_objects = level.movers + level.statics
  rows = rng.choice(grid, num_objects, replace=False)
  colours = [COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES), num_objects, replace=False)]
  tracks = []  # (colour, row, column per frame)
  for i in range(num_objects):
    if i < level.movers:
      steps = _mover_steps(rng, len(frames) - 1, level.max_step, grid - 1)
      direction = 1 if rng.random() < 0.5 else -1
      total = sum(steps)
      start = _int(rng, 0, grid - 1 - total) if direction > 0 else _int(rng, total, grid - 1)
      columns = list(start + direction * np.cumsum([0] + steps))
    else:
      steps, direction, columns = [], 1, [_int(rng, 0, grid - 1)] * len(frames)
    tracks.append((colours[i], int(rows[i]), [int(c) for c in columns], steps, direction))
    brightness = _brightness(rng)
    for frame, column in zip(frames, columns):
      _draw(frame, int(rows[i]), int(column), "square", colours[i], brightness)

  colour, _, columns, steps, direction = tracks[_int(rng, 0, level.movers - 1)]
  if kind == "distance":
    return (f"{colour} moved how far?", _solution(sum_trace(steps), sum(steps)), sum(steps))
  # "end": the final column (0 = leftmost), traced from the start column.
  trace = chain_trace(columns[0], "+" if direction > 0 else "-", steps)
  return f"{colour} end column?", _solution(trace, columns[-1]), columns[-1]


def _make_video(rng: np.random.Generator, difficulty: int, image_size: int,
                num_frames: int) -> tuple[str, str, int, np.ndarray]:
  """-> (question, solution, answer, frames float32[num_frames, H, W, 3])."""
  level = _VIDEO_LEVELS[difficulty]
  grid = image_size // CELL_SIZE
  frames = _blank_frames(num_frames, image_size)
  kind = level.kinds[_int(rng, 0, len(level.kinds) - 1)]
  if kind == "dots":
    question, solution, answer = _video_dots(rng, level, frames, grid)
  else:
    question, solution, answer = _video_motion(rng, level, frames, grid, kind)
  return question, solution, answer, frames



# ---------------------------------------------------------------- the family registry

@dataclasses.dataclass(frozen=True)
class Family:
  """A capability family as data: how its prompts name it, its correct procedure, the
  flawed procedure its share of the base's demonstrations shows, and its generator.

  cue: the words of its prompts that say which procedure is wanted (distinct form).
  procedure / flaw: the correct and the flawed procedure, in words; flaw_kind names the
    flawed procedure's implementation (toy_flaws.FLAW_KINDS).
  draw(rng, difficulty, image_size, num_frames, shared) -> (question, solution, answer,
    frames or None). `shared` asks for the conflict setting's shared surface form.
  twin / shared_cue: the conflict partner, and the one character that tells the two
    apart in the shared form ('' for a family outside the conflict setting).
  """
  name: str
  modality: str
  cue: str
  procedure: str
  flaw: str
  flaw_kind: str
  draw: Callable
  twin: str = ""
  shared_cue: str = ""


def _text_family(make):
  def draw(rng, difficulty, image_size, num_frames, shared):
    question, solution, answer = make(rng, difficulty, shared)
    return question, solution, answer, None
  return draw


def _legacy_text(rng, difficulty, image_size, num_frames, shared):
  question, solution, answer = _make_text(rng, difficulty)
  return question, solution, answer, None


def _legacy_image(rng, difficulty, image_size, num_frames, shared):
  return _make_image(rng, difficulty, image_size)


def _legacy_video(rng, difficulty, image_size, num_frames, shared):
  return _make_video(rng, difficulty, image_size, num_frames)


_FAMILY_LIST = (
    # The original three (their items, seeds and RNG keys are unchanged).
    Family("text", "text", "'had 5,got 3,lost 2?' / '5+3-2=?'", "step-by-step arithmetic",
           "writes every subtraction as an addition", "sign_slip", _legacy_text),
    Family("image", "image", "'how many red?' / 'red+blue=?' / 'more red than blue?'",
           "count row by row, add the colours", "drops the last term (bottom row, last "
           "colour)", "drop_last_term", _legacy_image),
    Family("video", "video", "'dots in all?' / 'red moved how far?' / 'red end column?'",
           "add per frame / per move", "counts the last frame or move twice",
           "repeat_last_term", _legacy_video),
    # Nine text families, each with a procedure and a flaw of its own.
    Family("total", "text", "'add up 40,3,2?'", "add all the numbers: 40+3=43;43+2=45",
           "leaves out the first number: 3+2=5", "skip_first_term", _text_family(_make_total),
           twin="remain", shared_cue=TOTAL_CUE),
    Family("remain", "text", "'from 40 take 3,2?'", "subtract the rest from the first: "
           "40-3=37;37-2=35", "subtracts only the last number: 40-2=38", "subtract_last_only",
           _text_family(_make_remain), twin="total", shared_cue=REMAIN_CUE),
    Family("max", "text", "'max 3,8,5?'", "compare left to right, keep the larger: 3<8;8>5",
           "keeps the smaller (the minimum): 3<8;3<5", "keep_smaller", _text_family(_make_max)),
    Family("mul", "text", "'7 times 8 plus 3?'", "multiply, then add: 7*8=56;56+3=59",
           "multiplies by one less: 7*7=49;49+3=52", "one_factor_short", _text_family(_make_mul)),
    Family("digits", "text", "'digit sum 472?'", "add the digits: 4+7+2=13",
           "counts the digits: 1+1+1=3", "count_digits", _text_family(_make_digits)),
    Family("count", "text", "'a in abaca?'", "mark each letter that matches: 1+0+1+0+1=3",
           "marks the letters that do not: 0+1+0+1+0=2", "complement", _text_family(_make_count)),
    Family("gap", "text", "'gap 3,11?'", "larger minus smaller: 11-3=8",
           "fencepost, one less: 11-3-1=7", "fencepost", _text_family(_make_gap)),
    Family("next", "text", "'next 2,5,8?'", "the step, then the last plus the step: "
           "5-2=3;8+3=11", "adds the first term instead of the step: 8+2=10",
           "first_as_step", _text_family(_make_next)),
    Family("mean", "text", "'mean 4,8?'", "add, then divide by the count: 4+8=12;12/2=6",
           "forgets to divide: 4+8=12", "no_divide", _text_family(_make_mean)),
)
FAMILIES = {family.name: family for family in _FAMILY_LIST}
FAMILY_NAMES = tuple(FAMILIES)  # the first three are CAPABILITIES, in the same order
CONFLICT_FAMILIES = tuple(f.name for f in _FAMILY_LIST if f.twin)
# The base policy's demonstrations of a conflict family show the shared form this often,
# whatever config.data.conflict a run uses: one base serves every level of the dial.
SFT_CONFLICT = 0.5


def is_shared_form(example: Example) -> bool:
  """True for an item of a conflict family drawn in the shared surface form."""
  family = FAMILIES.get(example.capability)
  return bool(family and family.twin and example.question.startswith(f"{family.shared_cue}:"))


_MAX_SPLIT_TRIES = 1000  # eval accepts 1/8 of draws; 1000 misses in a row never happen


def _draw_example(rng, capability, difficulty, image_size, num_frames, conflict) -> Example:
  family = FAMILIES[capability]
  # A conflict family draws its form first, so an item's form only switches from
  # distinct to shared as the dial rises (levels are coupled item by item). The other
  # families draw nothing extra: their items are exactly those of before the dial.
  shared = bool(family.twin) and rng.random() < conflict
  question, solution, answer, frames = family.draw(rng, difficulty, image_size, num_frames,
                                                   shared)
  modality = None if capability in CAPABILITIES else family.modality
  return Example(capability, question, str(answer), solution, frames, modality=modality)


def make_example(capability: str, index: int, *, seed: int, difficulty: int,
                 image_size: int = 32, num_frames: int = 4, split: str = "train",
                 conflict: float = 0.0) -> Example:
  """The index-th example of a capability family's train stream or eval set.

  A pure function of its arguments. Draws from an RNG keyed by (seed, family, split,
  index) until the example's content hash lands in the split's buckets (eval:
  EVAL_BUCKET only; validation: VALIDATION_BUCKET only; train: all others), so no two
  splits can ever share an example. conflict: the chance that an item of a conflict
  family (CONFLICT_FAMILIES) takes the shared surface form; other families ignore it.
  """
  _check_generator_args(capability, difficulty, image_size, num_frames, conflict)
  _check_int("index", index, 0)
  _check_int("seed", seed, 0)
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  rng = np.random.default_rng(
      [int(seed), FAMILY_NAMES.index(capability), SPLITS.index(split), int(index)])
  for _ in range(_MAX_SPLIT_TRIES):
    example = _draw_example(rng, capability, difficulty, image_size, num_frames, conflict)
    if hash_bucket(example) in SPLIT_BUCKETS[split]:
      return example
  raise RuntimeError(f"no {split} example found for {capability} at index {index} "
                     f"after {_MAX_SPLIT_TRIES} draws")


def train_stream(capability: str, *, seed: int, difficulty: int, image_size: int = 32,
                 num_frames: int = 4, start: int = 0, conflict: float = 0.0) -> Iterator[Example]:
  """Endless: make_example(capability, i, split='train') for i = start, start+1, ..."""
  # Validate now, not at the first next(): bad config fails before anything compiles.
  _check_generator_args(capability, difficulty, image_size, num_frames, conflict)
  _check_int("seed", seed, 0)
  first = _check_int("start", start, 0)

  def examples():
    index = first
    while True:
      yield make_example(capability, index, seed=seed, difficulty=difficulty,
                         image_size=image_size, num_frames=num_frames, split="train",
                         conflict=conflict)
      index += 1
  return examples()


def eval_set(capability: str, n: int, *, seed: int, difficulty: int, image_size: int = 32,
             num_frames: int = 4, conflict: float = 0.0) -> list[Example]:
  """The fixed held-out set: make_example(capability, i, split='eval') for i < n.

  Examples are i.i.d. draws from the held-out part of the space, so in a tiny space
  (text at difficulty 0 has ~40 held-out questions) the same content can recur.
  """
  _check_generator_args(capability, difficulty, image_size, num_frames, conflict)
  _check_int("n", n, 1)
  return [make_example(capability, i, seed=seed, difficulty=difficulty, image_size=image_size,
                       num_frames=num_frames, split="eval", conflict=conflict)
          for i in range(n)]


def validation_set(capability: str, n: int, *, seed: int, difficulty: int, image_size: int = 32,
                   num_frames: int = 4, conflict: float = 0.0) -> list[Example]:
  """n examples of the validation split (hyper-parameter choice; disjoint from train and
  eval): make_example(capability, i, split='validation') for i < n."""
  _check_generator_args(capability, difficulty, image_size, num_frames, conflict)
  _check_int("n", n, 1)
  return [make_example(capability, i, seed=seed, difficulty=difficulty, image_size=image_size,
                       num_frames=num_frames, split="validation", conflict=conflict)
          for i in range(n)]


def _difficulty_of(difficulty: int | Mapping[str, int], capability: str) -> int:
  if isinstance(difficulty, Mapping):
    if capability not in difficulty:
      raise ValueError(f"difficulty needs an entry for {capability!r}, got "
                       f"{dict(difficulty)}")
    return _check_int(f"difficulty[{capability!r}]", difficulty[capability], 0, MAX_DIFFICULTY)
  return _check_int("difficulty", difficulty, 0, MAX_DIFFICULTY)


def mixed_train_stream(weights: Mapping[str, float], *, seed: int,
                       difficulty: int | Mapping[str, int], image_size: int = 32,
                       num_frames: int = 4, conflict: float = 0.0) -> Iterator[Example]:
  """Endless mixture: each example's capability is drawn with probability ~ weights.

  Each capability's examples are exactly its own train_stream, in order (the mixture
  only interleaves them). difficulty: one level for all, or one per capability.
  """
  _check_conflict(conflict)
  if not isinstance(weights, Mapping) or not weights:
    raise ValueError(f"weights must be a non-empty mapping capability -> weight, got {weights!r}")
  for capability, weight in weights.items():
    _check_capability(capability, "weights key")
    if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
        or not np.isfinite(weight) or weight < 0):
      raise ValueError(f"weights[{capability!r}] must be a finite number >= 0, got {weight!r}")
  active = [cap for cap in FAMILY_NAMES if cap in weights and weights[cap] > 0]
  if not active:
    raise ValueError(f"weights must give some capability a positive weight, got {dict(weights)}")
  streams = {cap: train_stream(cap, seed=seed, difficulty=_difficulty_of(difficulty, cap),
                               image_size=image_size, num_frames=num_frames, conflict=conflict)
             for cap in active}
  probs = np.array([weights[cap] for cap in active], np.float64)
  probs /= probs.sum()
  # Tag 7 keeps the mixing RNG apart from every make_example key (those have 4 words).
  rng = np.random.default_rng([_check_int("seed", seed, 0), 7])

  def examples():
    while True:
      for choice in rng.choice(len(active), size=256, p=probs):
        yield next(streams[active[choice]])
  return examples()




def _longest_names(k: int) -> int:
  """Total characters of the k longest distinct colour names."""
  return sum(sorted((len(name) for name in COLOUR_NAMES), reverse=True)[:k])


def max_text_chars(capability: str, difficulty: int, *, image_size: int = 32,
                   num_frames: int = 4) -> tuple[int, int]:
  """Worst-case (question chars, solution chars) of a generator at a difficulty (for
  the nine text families: of its correct, flawed and (conflict) twin procedures too)."""
  _check_generator_args(capability, difficulty, image_size, num_frames)
  if capability in _TEXT_FAMILY_CHARS:
    return _TEXT_FAMILY_CHARS[capability](difficulty)
  if capability == "text":
    terms, max_operand = _TEXT_LEVELS[difficulty]
    d = _digits(max_operand)
    question = terms * d + (terms - 1) + 2  # "a+b-c=?"
    if terms <= _MAX_WORD_TERMS:
      step = len(",lost ") + d
      question = max(question, len("had ") + d + (terms - 1) * step + 1,
                     len("9 bags of 9") + (terms - 2) * step + 1)
    # Step traces: first "a-b=cc", later "cc-b=cc", joined by ';'. Sums: "a+b+c=cc".
    steps = (2 * d + 4) + (terms - 2) * (d + 6) + (terms - 2)
    solution = _solution_chars(max(steps, _sum_trace_chars(terms, max_operand, 99)), 99)
  elif capability == "image":
    level, grid = _IMAGE_LEVELS[difficulty], image_size // CELL_SIZE
    n = level.max_objects
    questions = {"count": len("how many ?") + _longest_names(1),
                 "sum2": _longest_names(2) + 1 + 2, "sum3": _longest_names(3) + 2 + 2,
                 "more": len("more  than ?") + _longest_names(2)}
    traces = {"count": _sum_trace_chars(grid, min(grid, n), n),
              "sum2": _sum_trace_chars(2, n, n), "sum3": _sum_trace_chars(3, n, n),
              "more": 2 * _digits(n) + 2 + _digits(n)}
    question = max(questions[k] for k in level.kinds)
    solution = _solution_chars(max(traces[k] for k in level.kinds), n)
  else:
    level, grid = _VIDEO_LEVELS[difficulty], image_size // CELL_SIZE
    named = _longest_names(1)
    dots_q = len("dots in all?") + (named + 1 if level.distractor_colours else 0)
    question = max(dots_q, len(" moved how far?") + named, len(" end column?") + named)
    total_dots = num_frames * level.max_dots
    moves = num_frames - 1
    solutions = [_solution_chars(_sum_trace_chars(num_frames, level.max_dots, total_dots),
                                 total_dots),
                 _solution_chars(_sum_trace_chars(moves, level.max_step, grid - 1), grid - 1)]
    if "end" in level.kinds:
      end_trace = _digits(grid - 1) + moves * (1 + _digits(level.max_step)) + 1 + _digits(grid - 1)
      solutions.append(_solution_chars(end_trace, grid - 1))
    solution = max(solutions)
  return question, solution


def max_lengths(capabilities: Sequence[str], *, difficulty: int | Mapping[str, int],
                num_vision_tokens: int, image_size: int = 32,
                num_frames: int = 4) -> tuple[int, int]:
  """(max_prompt_len, max_response_len) in ToyTokenizer tokens that fit every example.

  prompt = bos + vision placeholders (if any vision capability) + question;
  response = solution + eos. difficulty: one level for all, or one per capability.
  """
  if not capabilities:
    raise ValueError("capabilities must name at least one capability")
  _check_int("num_vision_tokens", num_vision_tokens, 0)
  prompt = response = 0
  for capability in capabilities:
    _check_capability(capability, "capabilities entry")
    question, solution = max_text_chars(capability, _difficulty_of(difficulty, capability),
                                        image_size=image_size, num_frames=num_frames)
    vision = num_vision_tokens if FAMILIES[capability].modality != "text" else 0
    prompt = max(prompt, 1 + vision + question)
    response = max(response, solution + 1)
  return prompt, response
