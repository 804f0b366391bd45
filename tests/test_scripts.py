"""Every script in scripts/ still runs: each benchmark at tiny sizes (`--smoke`) prints its figure line,
and the demos, too long for the default run, import and name only things that exist."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

# script -> the line its --smoke run must print (its figure, with numbers in it).
SMOKE = {
  "bench_attention": r"^ +global +1024 +[\d.]+ +[\d.]+ +[\d.]+x +[\d.]+$",
  "bench_convert": r"^Kaggle -> HF +[\d.]+ +[\d.]+ +[\d.]+ +-?[\d.]+ +\d+$",
  "bench_data": r"^prepared +[\d,]+ tokens/s",
  "bench_distill_memory": r"^marginal ours: [\d.]+ GiB per 1k extra tokens \(T 128 -> 256\); naive: [\d.]+$",
  "bench_export": r"^ +ours: export adds [\d.]+ GiB of peak RSS = [\d.]+x the model$",
  "bench_merge": r"^ties of 3 checkpoints: peak RSS \+[\d.]+ GiB = [\d.]+x one model, [\d.]+ s$",
  "bench_onpolicy": r"^\[smoke\] on-policy / off-policy step: [\d.]+x$",
  "bench_remote_data": r"^jsonl +\d+MiB +2 +[\d.]+ +[\d.]+-[\d.]+x +[\d,]+ / +[\d,]+ +[\d.]+x ",
  "bench_sample": r"^ours/HF: [\d.]+x$",
  "bench_train": r"^ratio ours/HF: [\d.]+x$",
  # compiles for a TPU topology: needs libtpu (pip install -e ".[tpu]")
  "aot_table": r"^\| pretrain_tiny \| v5p:2x2x1 \| - \| [\d.]+ \| [\d.]+ \|",
}
# Minutes at their smallest (they train real runs): imported, and their gemma2_jax imports resolved.
IMPORT_ONLY = ("distill_demo", "post_train_demo")


def script_env() -> dict:
  """As a user runs them: CPU, one device (not the 8 fake devices of the test process)."""
  return dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, JAX_PLATFORMS="cpu")


def run_smoke(name: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), "--smoke"], cwd=ROOT,
                        env=script_env(), capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def smoke_runs(request):
  """The selected scripts' --smoke runs, two at a time (2 cores: about half the wall time)."""
  selected = [item.callspec.params["name"] for item in request.session.items
              if getattr(item, "module", None) is request.module
              and getattr(item, "originalname", None) == "test_smoke_run"]
  selected = [n for n in selected if n != "aot_table" or HAS_LIBTPU]
  with ThreadPoolExecutor(max_workers=2) as pool:
    futures = {name: pool.submit(run_smoke, name) for name in selected}
    yield futures


def test_every_script_is_covered():
  scripts = {p.stem for p in SCRIPTS.glob("*.py")}
  assert scripts == set(SMOKE) | set(IMPORT_ONLY), (
    "every scripts/*.py needs a --smoke run in SMOKE (or, if it cannot be made short, an entry in "
    "IMPORT_ONLY) in tests/test_scripts.py")


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_smoke_run(name, smoke_runs):
  if name == "aot_table" and not HAS_LIBTPU:
    pytest.skip("aot_table compiles for TPU topologies: needs libtpu (pip install -e '.[tpu]')")
  result = smoke_runs[name].result()
  assert result.returncode == 0, (
    f"scripts/{name}.py --smoke exited {result.returncode}:\n{result.stderr[-3000:]}")
  assert re.search(SMOKE[name], result.stdout, re.M), (
    f"scripts/{name}.py --smoke did not print its figure line /{SMOKE[name]}/:\n{result.stdout[-3000:]}")


# Run in a fresh interpreter: imports each script (not as __main__) and every project name any
# script imports, inside functions too, so a moved or renamed module fails here and not at minute 3.
CHECK_IMPORTS = r"""
import ast, importlib, importlib.util, json, sys
root, names, import_only = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ours = lambda module: module.split(".")[0] in ("gemma2_jax", "tests")
sys.path.insert(0, root)
errors = {}
for name in names:
  path = f"{root}/scripts/{name}.py"
  problems = []
  if name in import_only:
    try:
      spec = importlib.util.spec_from_file_location(f"script_{name}", path)
      spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as e:
      problems.append(f"import: {type(e).__name__}: {e}")
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and ours(node.module):
      try:
        module = importlib.import_module(node.module)
      except Exception as e:
        problems.append(f"line {node.lineno}: {node.module}: {type(e).__name__}: {e}")
        continue
      for alias in node.names:
        if not (hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}")):
          problems.append(f"line {node.lineno}: {node.module} has no {alias.name}")
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if ours(alias.name):
          try:
            importlib.import_module(alias.name)
          except Exception as e:
            problems.append(f"line {node.lineno}: {alias.name}: {type(e).__name__}: {e}")
  if problems:
    errors[name] = problems
print(json.dumps(errors))
"""


def check_imports(root: Path, names: list[str], import_only: list[str]) -> dict[str, list[str]]:
  result = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, str(root), json.dumps(names),
                           json.dumps(import_only)], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_scripts_import_and_their_project_imports_resolve():
  import_only = list(IMPORT_ONLY) + ([] if HAS_LIBTPU else ["aot_table"])
  errors = check_imports(ROOT, sorted(set(SMOKE) | set(IMPORT_ONLY)), import_only)
  assert not errors, "scripts whose imports no longer resolve:\n" + "\n".join(
    f"  scripts/{name}.py {problem}" for name, problems in errors.items() for problem in problems)


def test_import_check_sees_a_broken_script(tmp_path):
  (tmp_path / "scripts").mkdir()
  (tmp_path / "scripts" / "bad.py").write_text(
    "def f():\n  from tests import no_such_helper\n  import tests.no_such_module\n\n\n"
    "raise RuntimeError('broken at import')\n")
  problems = check_imports(tmp_path, ["bad"], ["bad"])["bad"]
  assert problems[0] == "import: RuntimeError: broken at import"
  assert "line 2: tests has no no_such_helper" in problems
  assert any(p.startswith("line 3: tests.no_such_module: ModuleNotFoundError") for p in problems)


# scripts/bench_lm_eval.py: registered here, after the parametrized smoke runs were collected, so that
# the coverage and import checks above see it; its own smoke run is the test below.
SMOKE["bench_lm_eval"] = r"^ours/hf: [\d.]+x$"


def test_bench_lm_eval_smoke_run():
  result = run_smoke("bench_lm_eval")
  assert result.returncode == 0, f"scripts/bench_lm_eval.py --smoke exited {result.returncode}:\n" \
                                 f"{result.stderr[-3000:]}"
  assert re.search(SMOKE["bench_lm_eval"], result.stdout, re.M), result.stdout[-3000:]
  assert re.search(r"^loglikelihood_rolling +[\d.]+ +[\d.]+ +[\d.]+x$", result.stdout, re.M)
