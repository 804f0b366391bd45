"""The package's layering, read from the source with `ast` (nothing is imported, so no jax).

Layers, bottom to top; a module imports only from its own rank or below:
  0  gemma2_jax.errors, .paths, .parallel, .model, .data, .checkpoint (finer order: RANK0_MAY_IMPORT)
  1  gemma2_jax.inference, .merging, .benchmarks (the lm-eval backend)
  2  gemma2_jax.distill
  3  gemma2_jax.training
  4  gemma2_jax.cli
  5  the command shims gemma2_jax.<command> (each imports only gemma2_jax.cli.<command>) and the
     package root gemma2_jax/__init__.py (the public API: imports anything below cli).
Also: no import cycles (imports inside functions count; importing `a.b.c` runs the `__init__` of
package `a.b` first, so that edge counts too), no private name (`_x`) taken from another module, and
no library module (ranks 0-3) importing the commands.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PKG = "gemma2_jax"
PKG_DIR = Path(__file__).resolve().parents[1] / PKG

SHIMS = ("aot", "convert", "evaluate", "merge", "prepare_data", "sample", "teacher_logits", "train")
RANKS = {"errors": 0, "paths": 0, "parallel": 0, "model": 0, "data": 0, "checkpoint": 0,
         "inference": 1, "merging": 1, "benchmarks": 1, "distill": 2, "training": 3, "cli": 4,
         "shim": 5, "root": 5}
LIBRARY_TOP = 3  # ranks 0-3 are the library; cli and above are the commands
# Within rank 0, what each part may import besides itself (what holds today): errors and paths are
# the base; data and checkpoint are independent of each other.
RANK0_MAY_IMPORT = {
  "errors": set(),
  "paths": {"errors"},
  "parallel": {"errors", "paths"},
  "model": {"errors", "paths", "parallel"},
  "data": {"errors", "paths"},
  "checkpoint": {"errors", "paths", "parallel", "model"},
}
LAYERS = ("errors/paths/parallel/model/data/checkpoint (0) < inference, merging, benchmarks (1)"
          " < distill (2)"
          " < training (3) < cli (4) < command shims, package root (5)")


@dataclasses.dataclass(frozen=True)
class Edge:
  """`importer` runs `target` (a module) at `line`; `name` is what it takes from it, if not a module;
  `implicit` marks the `__init__` of a package that Python runs on the way to a submodule."""
  importer: str
  target: str
  line: int
  name: str | None = None
  implicit: bool = False

  def where(self, root: Path) -> str:
    return f"{module_file(root, self.importer)}:{self.line}"


def module_file(root: Path, module: str) -> str:
  rel = Path(*module.split(".")[1:])
  path = root / rel / "__init__.py" if (root / rel).is_dir() else root / rel.with_suffix(".py")
  return str(Path(root.name) / path.relative_to(root))


def modules(root: Path) -> dict[str, Path]:
  """Every module of the package under `root`, by dotted name (a package is its `__init__.py`)."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join((root.name, *parts))] = path
  return out


def packages_of(module: str) -> list[str]:
  """The packages enclosing `module` below the root, outermost first."""
  parts = module.split(".")
  return [".".join(parts[:i]) for i in range(2, len(parts))]


def scan(root: Path) -> tuple[dict[str, Path], list[Edge], list[tuple[str, int, str]]]:
  """(modules, import edges between them, private module attributes used as (importer, line, name))."""
  mods = modules(root)
  edges, attrs = [], []
  for importer, path in mods.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    own = importer if is_pkg else importer.rpartition(".")[0]  # the package relative imports start from
    found: list[Edge] = []
    bound: dict[str, str] = {}  # local name -> module it is bound to
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name == root.name or alias.name.startswith(root.name + "."):
            found.append(Edge(importer, alias.name, node.lineno))
            if alias.asname:
              bound[alias.asname] = alias.name
            else:
              bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = own.split(".")[:len(own.split(".")) - (node.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        if base != root.name and not base.startswith(root.name + "."):
          continue
        for alias in node.names:
          sub = f"{base}.{alias.name}"
          if sub in mods:
            found.append(Edge(importer, sub, node.lineno))
            bound[alias.asname or alias.name] = sub
          else:
            found.append(Edge(importer, base, node.lineno, name=alias.name))
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and is_private(node.attr):
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
          chain.insert(0, value.attr)
          value = value.value
        if isinstance(value, ast.Name) and value.id in bound:
          target = ".".join([bound[value.id], *chain])
          if target in mods and target != importer:
            attrs.append((importer, node.lineno, f"{target}.{node.attr}"))
    for edge in found:  # the __init__ of each package Python runs on the way to the target
      edges.append(edge)
      for pkg in packages_of(edge.target):
        if pkg not in (importer, *packages_of(importer)):
          edges.append(Edge(importer, pkg, edge.line, implicit=True))
  return mods, sorted(set(edges), key=lambda e: (e.importer, e.line, e.target)), attrs


def is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def part(module: str) -> str | None:
  """The layer part of a module: 'root', 'shim', or its first component below the package."""
  parts = module.split(".")
  if len(parts) == 1:
    return "root"
  if len(parts) == 2 and parts[1] in SHIMS or parts[1:] == ["benchmarks", "__main__"]:
    return "shim"  # (`python -m gemma2_jax.benchmarks` is the package's __main__)
  return parts[1] if parts[1] in RANKS else None


def cycles(mods, edges: list[Edge]) -> list[list[Edge]]:
  """One cycle (as its edges) through each strongly connected group of modules."""
  graph: dict[str, dict[str, Edge]] = {m: {} for m in mods}
  for e in edges:
    if e.target in graph and e.target != e.importer:
      graph[e.importer].setdefault(e.target, e)
  index, low, stack, on, groups = {}, {}, [], set(), []

  def visit(v):  # Tarjan, iteratively (no recursion limit to worry about)
    work = [(v, iter(sorted(graph[v])))]
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is None:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          group = set()
          while True:
            w = stack.pop()
            on.discard(w)
            group.add(w)
            if w == node:
              break
          if len(group) > 1:
            groups.append(group)
      elif child not in index:
        index[child] = low[child] = len(index)
        stack.append(child)
        on.add(child)
        work.append((child, iter(sorted(graph[child]))))
      elif child in on:
        low[node] = min(low[node], index[child])

  for v in sorted(graph):
    if v not in index:
      visit(v)
  out = []
  for group in groups:  # the shortest way from the group's first module back to itself
    start = min(group)
    paths = {start: []}
    frontier = [start]
    while frontier and start not in {t for f in frontier for t in graph[f]}:
      nxt = []
      for f in frontier:
        for t in sorted(graph[f]):
          if t in group and t not in paths:
            paths[t] = paths[f] + [graph[f][t]]
            nxt.append(t)
      frontier = nxt
    last = next(f for f in frontier if start in graph[f])
    out.append(paths[last] + [graph[last][start]])
  return out


def rank_violations(root: Path, mods, edges: list[Edge]) -> list[str]:
  out = []
  for m in mods:
    if part(m) is None:
      out.append(f"{module_file(root, m)}: {m} is in no layer; give {m.split('.')[1]} a rank in "
                 "tests/test_layout.py (RANKS) when adding a subpackage")
  for e in edges:
    src, dst = part(e.importer), part(e.target)
    if src is None or dst is None or e.implicit:
      continue
    rule = None
    if src == "shim":
      if e.target != f"{PKG}.cli.{e.importer.split('.')[1]}":
        rule = f"a command shim imports only its {PKG}.cli.{e.importer.split('.')[1]}"
    elif src == "root":
      if RANKS[dst] > LIBRARY_TOP:
        rule = "the package root (public API) imports only from the library (ranks 0-3), not the commands"
    elif RANKS[dst] > RANKS[src]:
      rule = f"a module imports only from its own rank or below ({LAYERS})"
    elif RANKS[src] == RANKS[dst] == 0 and dst != src and dst not in RANK0_MAY_IMPORT[src]:
      may = ", ".join(sorted(RANK0_MAY_IMPORT[src])) or "nothing else of the package"
      rule = f"within rank 0, {src} may import only {may} (RANK0_MAY_IMPORT)"
    if rule:
      out.append(f"{e.where(root)}: {e.importer} ({src}, rank {RANKS[src]}) imports {e.target} "
                 f"({dst}, rank {RANKS[dst]}): layer rule: {rule}")
  return out


def library_command_imports(root: Path, edges: list[Edge]) -> list[str]:
  return [f"{e.where(root)}: library module {e.importer} imports {e.target}: the library (ranks 0-3) "
          f"must not import the commands ({PKG}.cli or a shim); move the shared code down into the "
          "library, or the command code up into cli"
          for e in edges
          if not e.implicit and part(e.importer) in RANKS and RANKS[part(e.importer)] <= LIBRARY_TOP
          and part(e.target) in ("cli", "shim")]


def private_imports(root: Path, edges: list[Edge], attrs) -> list[str]:
  out = []
  for e in edges:
    if e.name and is_private(e.name) and e.target != e.importer:
      out.append(f"{e.where(root)}: {e.importer} imports private name {e.name} from {e.target}: "
                 "a private name is used only in its own module; make it public (drop the underscore) "
                 "or move the code")
    private_mod = next((p for p in e.target.split(".") if is_private(p)), None)
    if private_mod and not e.implicit and e.target.rpartition(".")[0] not in (
        e.importer, *packages_of(e.importer)):
      out.append(f"{e.where(root)}: {e.importer} imports private module {e.target} from outside its "
                 "package: a private module is used only within its own package")
  for importer, line, name in attrs:
    out.append(f"{module_file(root, importer)}:{line}: {importer} uses private name {name}: a private "
               "name is used only in its own module; make it public (drop the underscore) or move the code")
  return out


def cycle_violations(root: Path, mods, edges) -> list[str]:
  return ["import cycle (no module may import, even inside a function, one that imports it back): "
          + " -> ".join(f"{c.importer} ({c.where(root)}{', package __init__' if c.implicit else ''})"
                        for c in cycle) + f" -> {cycle[0].importer}"
          for cycle in cycles(mods, edges)]


@pytest.fixture(scope="module")
def package():
  return scan(PKG_DIR)


def report(violations: list[str]) -> str:
  return f"{len(violations)} layout violation(s):\n" + "\n".join(violations)


def test_no_import_cycles(package):
  mods, edges, _ = package
  violations = cycle_violations(PKG_DIR, mods, edges)
  assert not violations, report(violations)


def test_imports_follow_the_rank_order(package):
  mods, edges, _ = package
  violations = rank_violations(PKG_DIR, mods, edges)
  assert not violations, report(violations)


def test_library_does_not_import_the_commands(package):
  _, edges, _ = package
  violations = library_command_imports(PKG_DIR, edges)
  assert not violations, report(violations)


def test_no_private_names_across_modules(package):
  _, edges, attrs = package
  violations = private_imports(PKG_DIR, edges, attrs)
  assert not violations, report(violations)


def test_scan_sees_every_kind_of_import(package):
  """The rules above are only as good as the scan: it sees imports inside functions, submodules
  taken with `from`, and the package `__init__` such an import runs."""
  mods, edges, _ = package
  assert {part(m) for m in mods} >= {"root", "shim", "cli", "training", "distill", "inference", "model",
                                     "data", "checkpoint", "parallel", "paths"}
  pairs = {(e.importer, e.target) for e in edges}
  assert (f"{PKG}.training.loop", f"{PKG}.data.pipeline") in pairs  # inside a method
  assert (f"{PKG}.model.attention", f"{PKG}.model.splash") in pairs  # inside a function
  assert (f"{PKG}.training.state", f"{PKG}.checkpoint") in pairs  # from gemma2_jax import checkpoint
  assert (f"{PKG}.training.loop", f"{PKG}.checkpoint") in pairs  # the __init__ run by checkpoint.manager
  assert (f"{PKG}.train", f"{PKG}.cli.train") in pairs


def test_test_files_import_helpers_not_other_test_files():
  """Shared test code lives in helper modules (tests/tiny.py, tests/hf_utils.py, ...): importing a
  test file from another would collect and run its tests' module-level setup twice."""
  tests_dir = Path(__file__).resolve().parent
  found = []
  for path in sorted(tests_dir.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else
               [a.name for a in node.names] if isinstance(node, ast.Import) else [])
      found += [f"tests/{path.name}:{node.lineno}: imports {name}" for name in names
                if name.startswith("tests.test_")]
  violations = [f"{f}: import shared test code from a helper module (e.g. tests/tiny.py), not a test "
                "file" for f in found]
  assert not violations, report(violations)


def write(root: Path, files: dict[str, str]):
  for rel, text in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def test_each_rule_catches_its_violation(tmp_path):
  """A made-up package breaking each rule once: every rule names the module and line."""
  root = tmp_path / PKG
  write(root, {
    "__init__.py": "from gemma2_jax.cli import common\n",
    "train.py": "from gemma2_jax.cli.train import main\nfrom gemma2_jax.training import loop\n",
    "paths.py": "",
    "cli/__init__.py": "", "cli/common.py": "", "cli/train.py": "from gemma2_jax.training.loop import run\n",
    "model/__init__.py": "", "data/__init__.py": "",
    "model/a.py": "def f():\n  from gemma2_jax.model import b\n",
    "model/b.py": "import gemma2_jax.model.a as a\n\na._hidden()\n",
    "model/c.py": "from gemma2_jax.data.x import _private\n",
    "data/x.py": "def _private():\n  pass\n",
    "data/y.py": "from . import x\nfrom ..cli.common import parser\n",
    "model/d.py": "from gemma2_jax.checkpoint.errors import Error\n",  # runs checkpoint/__init__.py
    "checkpoint/__init__.py": "from gemma2_jax.model.d import x\n", "checkpoint/errors.py": "",
    "training/__init__.py": "",
    "training/loop.py": "from gemma2_jax.inference.sampler import Sampler\n\n\ndef run():\n  pass\n",
    "inference/__init__.py": "",
    "inference/sampler.py": "def g():\n  from gemma2_jax.training.loop import run\n",
  })
  mods, edges, attrs = scan(root)
  assert ("gemma2_jax.data.y", "gemma2_jax.data.x") in {(e.importer, e.target) for e in edges}
  found = "\n".join(cycle_violations(root, mods, edges))
  assert ("gemma2_jax.model.a (gemma2_jax/model/a.py:2) -> gemma2_jax.model.b (gemma2_jax/model/b.py:1) "
          "-> gemma2_jax.model.a") in found
  assert "gemma2_jax.inference.sampler" in found and "gemma2_jax/training/loop.py:1" in found
  assert ("gemma2_jax.checkpoint (gemma2_jax/checkpoint/__init__.py:1) -> gemma2_jax.model.d "
          "(gemma2_jax/model/d.py:1, package __init__) -> gemma2_jax.checkpoint") in found
  ranks = "\n".join(rank_violations(root, mods, edges))
  assert "gemma2_jax/inference/sampler.py:2: gemma2_jax.inference.sampler" in ranks
  assert "gemma2_jax/train.py:2:" in ranks and "a command shim imports only" in ranks
  assert "gemma2_jax/__init__.py:1:" in ranks and "package root" in ranks
  assert "gemma2_jax/model/c.py:1:" in ranks and "within rank 0, model may import only" in ranks
  assert "gemma2_jax/data/y.py:2:" in ranks
  assert "gemma2_jax/cli/train.py" not in ranks and "gemma2_jax/model/a.py" not in ranks
  commands = library_command_imports(root, edges)
  assert len(commands) == 1 and commands[0].startswith("gemma2_jax/data/y.py:2: library module")
  private = "\n".join(private_imports(root, edges, attrs))
  assert "gemma2_jax/model/c.py:1: gemma2_jax.model.c imports private name _private" in private
  assert "gemma2_jax/model/b.py:3: gemma2_jax.model.b uses private name gemma2_jax.model.a._hidden" in private
  assert "data/x.py" not in private
