"""The architecture's rules, read from the source: imports run one way (models <- data <- rl
<- entry points, sharding.py imports nothing of ours), no import cycle (imports inside
functions count), no module over 600 lines, one decoder, and a small train-step signature."""
import ast
import inspect
import pathlib
import textwrap

import pytest

import paths
from copd_jax.rl import step

ROOT = pathlib.Path(paths.REPO)
MAX_LINES = 600


def package_modules() -> dict[str, pathlib.Path]:
  """Module name -> file for copd_jax/ and kernels/ (installed as copd_jax.kernels)."""
  out = {}
  for base, folder in (("copd_jax", ROOT / "copd_jax"), ("copd_jax.kernels", ROOT / "kernels")):
    for path in folder.rglob("*.py"):
      parts = path.relative_to(folder).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join((base,) + parts)] = path
  return out


def imports_of(path: pathlib.Path, modules) -> set[str]:
  """Our modules that `path` imports anywhere in the file (also inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("copd_jax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.add(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("copd_jax"))
  return {m for m in found if m in modules}


@pytest.fixture(scope="module")
def graph():
  modules = package_modules()
  return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))
  for v in graph:
    if v not in index:
      visit(v)
  return found


def test_cycle_finder_finds_a_planted_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle(graph):
  assert cycles(graph) == []


def test_imports_run_one_way(graph):
  def ours(name, prefix):
    return {m for m in graph[name] if m.startswith(prefix)}
  for name in graph:
    if name.startswith("copd_jax.models"):
      assert not ours(name, "copd_jax.data") and not ours(name, "copd_jax.rl"), name
    if name.startswith("copd_jax.data"):
      assert not ours(name, "copd_jax.rl"), name
  # sharding sits under everything: it may know the LoRA branch container (a leaf module
  # that itself imports nothing of ours), nothing else.
  assert graph["copd_jax.sharding"] <= {"copd_jax.models.lora"}
  assert graph["copd_jax.models.lora"] == set()


def test_no_module_over_600_lines():
  long = {name: n for name, path in package_modules().items()
          if (n := len(path.read_text().splitlines())) > MAX_LINES}
  assert long == {}


def test_one_decoder():
  """Attention and decoder layers are defined once, in models/decoder.py; the vision
  towers' own blocks (named Vision*) are theirs."""
  elsewhere = []
  for name, path in package_modules().items():
    if name == "copd_jax.models.decoder":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ClassDef) and not node.name.startswith("Vision") and any(
          word in node.name for word in ("Attention", "DecoderLayer", "Decoder")):
        elsewhere.append(f"{name}.{node.name}")
  assert elsewhere == []


def test_the_step_functions_take_at_most_five_parameters():
  """The stage trainer closes over the stage's statics: no function of a step (self
  counted) carries more than five parameters."""
  from copd_jax.rl import loop, rollout, update
  step_functions = [
      step.StageTrainer.step, step.StageTrainer.rollout, step.StageTrainer.update,
      step.StageTrainer.teachers, step.step_metrics, rollout.StageRollout.collect_rollouts,
      rollout.StageRollout._draw, rollout.StageRollout._sample, rollout.StageRollout._score,
      update.StageUpdate.apply_update, loop.train_loop]
  too_many = {f.__qualname__: len(inspect.signature(f).parameters) for f in step_functions
              if len(inspect.signature(f).parameters) > 5}
  assert too_many == {}


# The modules of one step: what StageTrainer.step reaches in the stage trainer, the host
# rollout, the update, teacher scoring, the rows and the sampler.
STEP_MODULES = ("copd_jax/rl/step.py", "copd_jax/rl/rollout.py", "copd_jax/rl/update.py",
                "copd_jax/rl/scoring.py", "copd_jax/rl/rows.py", "copd_jax/sampling/api.py",
                "copd_jax/sampling/decode.py")
MAX_PARAMETERS = 5


def parameter_names(node) -> list[str]:
  """A def's or lambda's positional and keyword-only parameters, a leading self / cls left
  out (*args and **kwargs are not counted)."""
  args = node.args
  names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
  return names[1:] if names[:1] in (["self"], ["cls"]) else names


def functions_over(source: str, limit: int = MAX_PARAMETERS) -> list[str]:
  """'Qualified.name:line (k)' of every function, method, nested function and lambda of
  `source` with more than `limit` parameters (parameter_names)."""
  found = []

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        name = prefix + getattr(child, "name", "<lambda>")
        count = len(parameter_names(child))
        if count > limit:
          found.append(f"{name}:{child.lineno} ({count})")
        visit(child, name + ".")
      elif isinstance(child, ast.ClassDef):
        visit(child, prefix + child.name + ".")
      else:
        visit(child, prefix)
  visit(ast.parse(source), "")
  return found


def test_functions_over_counts_positional_and_keyword_only_parameters():
  source = textwrap.dedent("""
      def five(a, b, c, d, e): ...
      def six(a, b, /, c, *rest, d, e=1, f=2, **options): ...
      class Holder:
        def method(self, a, b, c, d, e): ...
        @classmethod
        def build(cls, a, b, c, d, e, f): ...
      def outer(x):
        def inner(a, b, c, d, e, f=0): ...
        return lambda a, b, c, d, e, f: a
      """)
  assert functions_over(source) == ["six:3 (6)", "Holder.build:7 (6)", "outer.inner:9 (6)",
                                    "outer.<lambda>:10 (6)"]


def test_no_function_of_the_step_takes_more_than_five_parameters():
  """No function of a step's modules (nested ones and lambdas too) carries more than five
  parameters: the stage's statics are bound when the step is built (update.UpdateFn,
  sampling.Sampler), and what travels together travels as one value (TrainState, Rows,
  Teachers, sampling.Prompts, rows.RowInputs)."""
  found = {path: over for path in STEP_MODULES
           if (over := functions_over((ROOT / path).read_text()))}
  assert found == {}


def reachable(graph, start: str) -> set[str]:
  """Every module importing `start` imports, transitively; importing a.b.c also runs the
  packages a and a.b, so they count too."""
  seen, todo = set(), [start]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    parts = name.split(".")
    parents = {".".join(parts[:i]) for i in range(1, len(parts))}
    todo.extend((graph.get(name, set()) | parents) - seen)
  return seen


def test_reachable_follows_chains_and_parent_packages():
  graph = {"k": {"k.a"}, "k.a": {"m"}, "m": {"r.x"}, "r": set(), "r.x": set()}
  assert reachable(graph, "k.a") == {"k", "k.a", "m", "r", "r.x"}


def test_kernels_import_nothing_from_rl(graph):
  """The fused kernels sit below rl/: the policy loss they call lives in copd_jax.losses,
  and no chain of imports from any copd_jax.kernels module reaches copd_jax.rl."""
  kernel_modules = [m for m in graph if m == "copd_jax.kernels" or m.startswith("copd_jax.kernels.")]
  assert len(kernel_modules) > 5
  assert graph["copd_jax.losses"] == set()
  reached = {m: sorted(r for r in reachable(graph, m)
                       if r == "copd_jax.rl" or r.startswith("copd_jax.rl."))
             for m in kernel_modules}
  assert {m: r for m, r in reached.items() if r} == {}


def test_importing_the_kernels_loads_no_rl_module():
  """The same rule at run time, which also sees imports made through importlib."""
  import subprocess
  import sys
  code = ("import sys, copd_jax.kernels, copd_jax.kernels.tpu_check, copd_jax.losses; "
          "print(sorted(m for m in sys.modules if m.startswith('copd_jax.rl')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=ROOT, timeout=300)
  assert out.stdout.strip().splitlines()[-1] == "[]"


def test_tests_mirror_the_packages():
  """tests/<dir>/ holds the tests of the package of that name (copd_jax/<dir>, kernels/
  or experiments/), and a module of a package is tested there, not in a flat file:
  no tests/test_<m>.py for a module m that lives in a package directory."""
  tests = ROOT / "tests"
  packages = {p.name for p in (ROOT / "copd_jax").iterdir() if (p / "__init__.py").is_file()}
  packages |= {"kernels", "experiments"}
  dirs = {p.name for p in tests.iterdir() if p.is_dir() and p.name not in ("fixtures",
                                                                             "__pycache__")}
  assert dirs <= packages, f"tests/ directories without a package: {sorted(dirs - packages)}"
  assert {"models", "data", "rl", "kernels", "analysis"} <= dirs
  in_packages = {path.stem for name in packages
                 for path in (ROOT / ("copd_jax/" + name if name not in ("kernels", "experiments")
                                      else name)).glob("*.py") if path.stem != "__init__"}
  top_level = {path.stem for path in (ROOT / "copd_jax").glob("*.py")}
  misplaced = [path.name for path in tests.glob("test_*.py")
               if path.stem[len("test_"):] in in_packages - top_level]
  assert not misplaced, f"tests of package modules outside their package's directory: {misplaced}"
  # Module names are global under pytest's rootdir import mode: no two test files share one.
  names = [path.name for path in tests.rglob("test_*.py") if "fixtures" not in path.parts]
  assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


# One execution path: every run has a RunSharding (one device is a mesh of size 1), so no
# code asks whether there is one, and the unsharded twins are gone.
_RUN_NAMES = {"sharding", "run"}  # what holds a run's RunSharding
_TWIN_NAMES = {"ShardedFunction", "sharded_update", "sharded_generate", "stacked_generate_body"}


def _holds_the_run(node) -> bool:
  """`sharding`, `run`, or `<ctx | plan | self>.sharding`."""
  if isinstance(node, ast.Name):
    return node.id in _RUN_NAMES
  return (isinstance(node, ast.Attribute) and node.attr == "sharding"
          and isinstance(node.value, ast.Name) and node.value.id in ("ctx", "plan", "self"))


def execution_path_twins(source: str) -> list[str]:
  """The twin-path branches in `source`: `<run> is (not) None`, `<run> or ...`, a mesh
  set only sometimes (`set_mesh(...) if ... else nullcontext()`), and definitions of the
  deleted twins."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
      operands = [node.left] + node.comparators
      if any(_holds_the_run(x) for x in operands) and any(
          isinstance(x, ast.Constant) and x.value is None for x in operands):
        found.append(f"line {node.lineno}: {ast.unparse(node)}")
    elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and _holds_the_run(node.values[0]):
      found.append(f"line {node.lineno}: {ast.unparse(node)}")
    elif isinstance(node, ast.IfExp) and "nullcontext" in ast.unparse(node) and \
        "set_mesh" in ast.unparse(node):
      found.append(f"line {node.lineno}: {ast.unparse(node)}")
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in _TWIN_NAMES:
      found.append(f"line {node.lineno}: def {node.name}")
    elif isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id in _TWIN_NAMES for t in node.targets):
      found.append(f"line {node.lineno}: {ast.unparse(node)}")
  return found


def test_twin_finder_finds_planted_twins():
  planted = textwrap.dedent("""
      def collect(plan, ctx, sharding=None):
        if sharding is None:
          return 1
        local = ctx.sharding is not None
        on_mesh = jax.set_mesh(m) if local else contextlib.nullcontext()
        run = sharding or one_device()
      class ShardedFunction: pass
      """)
  assert len(execution_path_twins(planted)) == 5
  assert execution_path_twins("x = y.sharding is None\nrun = make_run()\n") == []


def test_one_execution_path():
  twins = {str(path.relative_to(ROOT)): found for path in sorted((ROOT / "copd_jax").rglob("*.py"))
           if (found := execution_path_twins(path.read_text()))}
  assert not twins, f"execution paths that branch on having a mesh: {twins}"


# The config is translated once: `main` (and the other entry points) turn the
# ml_collections ConfigDict into a run_spec.RunSpec with config_lib.build, and every module
# below them takes the RunSpec (or the section it needs), never the ConfigDict.
CONFIG_LAYER = {
    "copd_jax.main": "the entry point: builds the RunSpec once (config_lib.build)",
    "copd_jax.config_lib": "checks the ConfigDict and translates it (build)",
    "copd_jax.default_config": "defines the configs (ConfigDicts)",
    "copd_jax.cli": "parses --config (ml_collections config_flags) for the entry points",
    "copd_jax.memory_budget": "a config check: run by config_lib.build on the ConfigDict and "
                              "by main --dry_run, before any run object exists",
}
# Entry points besides main: they may use cli's command-line conventions, but read no
# ConfigDict themselves (export rebuilds the RunSpec from the run's config.json).
ENTRY_POINTS = {"copd_jax.export": "python -m copd_jax.export"}
_CONFIG_NAMES = {"ml_collections", "ConfigDict", "FrozenConfigDict", "config_flags",
                 "to_json_best_effort"}


def config_dict_reads(source: str) -> list[str]:
  """Where `source` imports ml_collections or names a ConfigDict (a name or attribute in
  _CONFIG_NAMES; comments and docstrings do not count)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [f"line {node.lineno}: import {a.name}" for a in node.names
                if a.name.split(".")[0] == "ml_collections"]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ml_collections":
      found.append(f"line {node.lineno}: from {node.module} import ...")
    elif isinstance(node, ast.Name) and node.id in _CONFIG_NAMES:
      found.append(f"line {node.lineno}: {node.id}")
    elif isinstance(node, ast.Attribute) and node.attr in _CONFIG_NAMES:
      found.append(f"line {node.lineno}: .{node.attr}")
  return found


def test_config_dict_finder_finds_planted_reads():
  planted = textwrap.dedent("""
      import ml_collections
      from ml_collections import config_flags
      def f(cfg: ml_collections.ConfigDict):
        return json.loads(cfg.to_json_best_effort())
      """)
  assert len(config_dict_reads(planted)) == 5
  assert config_dict_reads('"""Reads no ml_collections ConfigDict."""\nx = spec.rl.opd\n') == []


def test_no_module_below_main_reads_a_config_dict(graph):
  modules = package_modules()
  assert set(CONFIG_LAYER) | set(ENTRY_POINTS) <= set(modules)
  below = {name: path for name, path in modules.items() if name not in CONFIG_LAYER}
  reads = {name: found for name, path in below.items()
           if (found := config_dict_reads(path.read_text()))}
  assert reads == {}, f"modules below main that read the ConfigDict: {reads}"
  # ... nor reach one through the config layer (an import inside a function counts).
  through = {name: sorted(graph[name] & set(CONFIG_LAYER)) for name in below
             if name not in ENTRY_POINTS and graph[name] & set(CONFIG_LAYER)}
  assert through == {}, f"modules below main that import the config layer: {through}"
  assert {m for m in ENTRY_POINTS if graph[m] & set(CONFIG_LAYER) - {"copd_jax.cli"}} == set()


def _config_dicts_in(value, where: str = "spec") -> list[str]:
  """Paths of every ConfigDict inside value (dataclasses, dicts, lists, tuples)."""
  import dataclasses
  import ml_collections
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return [where]
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return [p for f in dataclasses.fields(value)
            for p in _config_dicts_in(getattr(value, f.name), f"{where}.{f.name}")]
  if isinstance(value, dict):
    return [p for k, v in value.items() for p in _config_dicts_in(v, f"{where}[{k!r}]")]
  if isinstance(value, (list, tuple)):
    return [p for i, v in enumerate(value) for p in _config_dicts_in(v, f"{where}[{i}]")]
  return []


def test_run_context_holds_a_run_spec_without_config_dicts():
  """At run time: the RunSpec main hands down (config_lib.build) of every method and of
  the shipped configs holds no ConfigDict at any depth, and RunContext carries a RunSpec."""
  import typing

  from copd_jax import cli, config_lib, default_config, run_spec
  from copd_jax.rl import loop
  assert typing.get_type_hints(loop.RunContext)["cfg"] is run_spec.RunSpec
  configs = [default_config.get(m, "micro") for m in default_config.METHODS]
  configs += [cli.load_config_file(str(ROOT / "configs" / f"{name}.py"))
              for name in ("hf_copd", "hf_vl_copd", "pod_4b")]
  for cfg in configs:
    spec = config_lib.spec_of(cfg)
    assert isinstance(spec, run_spec.RunSpec)
    assert _config_dicts_in(spec) == [], cfg.method
    assert spec.config_json["rl" if cfg.method != "base" else "method"]  # the resolved config


# Module state a function rebinds (`global x`), and why each is not a setting: the reward
# settings travel with the run (policy_setup.RunSetup.rewards), never through a global.
ALLOWED_GLOBALS = {
    ("copd_jax.data.math_verifier", "_pool"): "the process's verifier worker processes, "
                                              "rebuilt when the settings passed in change",
    ("copd_jax.data.reward_values", "_first_traceback_printed"): "print a plug-in's "
                                                                 "traceback once per process",
}


def test_no_settings_held_in_module_globals():
  rebound = {(name, n) for name, path in package_modules().items()
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Global)
             for n in node.names}
  assert rebound <= set(ALLOWED_GLOBALS), sorted(rebound - set(ALLOWED_GLOBALS))


_MUTATING_METHODS = {"append", "extend", "insert", "pop", "popitem", "remove", "clear",
                     "update", "setdefault", "add", "discard", "appendleft", "popleft"}
_MUTABLE_CALLS = {"list", "dict", "set", "deque", "defaultdict", "OrderedDict", "Counter"}


def _is_mutable_container(value) -> bool:
  if isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
    return True
  if isinstance(value, ast.Call):
    fn = value.func
    name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
    return name in _MUTABLE_CALLS
  return False


def mutated_module_containers(source: str) -> list[str]:
  """Module-level names bound to a list / dict / set (or deque, defaultdict, ...) that a
  function mutates in place (x.append(...), x.pop(), x[k] = v, del x[k], ...): module state
  without a `global` statement, e.g. a list used as a context stack."""
  tree = ast.parse(source)
  containers = set()
  for node in tree.body:
    targets, value = [], None
    if isinstance(node, ast.Assign):
      targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
      targets, value = [node.target], node.value
    if value is not None and _is_mutable_container(value):
      containers.update(t.id for t in targets if isinstance(t, ast.Name))
  found = set()
  for fn in ast.walk(tree):
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      continue
    for node in ast.walk(fn):
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
          node.func.attr in _MUTATING_METHODS and isinstance(node.func.value, ast.Name) and \
          node.func.value.id in containers:
        found.add(node.func.value.id)
      targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                 [node.target] if isinstance(node, ast.AugAssign) else [])
      for t in targets:
        if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and \
            t.value.id in containers:
          found.add(t.value.id)
  return sorted(found)


def test_mutable_container_finder_finds_a_planted_stack():
  planted = textwrap.dedent("""
      _STACK: list = []
      _TABLE = {"a": 1}
      _SEEN = set()
      _FROZEN = (1, 2)
      CONSTANT = {"read": "only"}
      def push(x):
        _STACK.append(x)
      def remember(k, v):
        _TABLE[k] = v
        _SEEN.add(k)
      def read(k):
        local = []
        local.append(k)
        return CONSTANT[k], _FROZEN
      """)
  assert mutated_module_containers(planted) == ["_SEEN", "_STACK", "_TABLE"]


# Module-level containers a function fills, and why each is not a setting.
ALLOWED_MUTATED_CONTAINERS: dict[tuple[str, str], str] = {}


def test_no_settings_held_in_module_level_containers():
  found = {(name, n) for name, path in package_modules().items()
           for n in mutated_module_containers(path.read_text())}
  assert found <= set(ALLOWED_MUTATED_CONTAINERS), sorted(found - set(ALLOWED_MUTATED_CONTAINERS))
