"""The architecture's rules, read from the source: imports run one way (models <- data <- rl
<- entry points, sharding.py imports nothing of ours), no import cycle (imports inside
functions count), no module over 600 lines, one decoder, and a small train-step signature."""
import ast
import inspect
import pathlib
import textwrap

import pytest

from copd_jax.rl import step

ROOT = pathlib.Path(__file__).resolve().parents[1]
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
  assert graph["copd_jax.sharding"] == set()


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


def test_train_step_takes_at_most_six_parameters():
  assert len(inspect.signature(step.train_step).parameters) <= 6


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
