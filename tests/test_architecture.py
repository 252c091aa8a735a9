"""The import graph of lopt, read from the source (not by eye): no arrow on the design's
never-list, no cycle, no import inside a function except of an optional dependency, and
`import learned_opt` loads only what an optax user needs."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Source folder -> installed package name (setup.py's package_dir).
PACKAGES = {"learned_opt": "learned_opt", "tasks": "learned_opt.tasks",
            "meta_train": "learned_opt.meta_train"}
# Imported inside functions on purpose: optional dependencies (install extras) and the
# Pallas kernel, loaded on the first fused update.
LAZY_OK = ("ray", "matplotlib", "tensorflow_datasets", "tensorboardX",
           "learned_opt.fused.kernel", "learned_opt.meta_train.distributed")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for folder, package in PACKAGES.items():
    for path in (ROOT / folder).rglob("*.py"):
      rel = path.relative_to(ROOT / folder).with_suffix("")
      parts = [p for p in rel.parts if p != "__init__"]
      out[".".join([package] + parts)] = path
  return out


MODULES = _modules()


def _is_package(name: str) -> bool:
  return MODULES.get(name) is not None and MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, bool, int]]:
  """(imported lopt-or-external module, inside a function?, line) for one module."""
  path = MODULES[name]
  tree = ast.parse(path.read_text(), str(path))
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        out.extend((a.name, fn, child.lineno) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:  # relative import
          pkg = name if _is_package(name) else name.rpartition(".")[0]
          for _ in range(child.level - 1):
            pkg = pkg.rpartition(".")[0]
          base = f"{pkg}.{base}".rstrip(".")
        for a in child.names:
          sub = f"{base}.{a.name}"
          out.append((sub if sub in MODULES else base, fn, child.lineno))
      visit(child, fn)

  visit(tree, False)
  return out


GRAPH = {m: _imports(m) for m in MODULES}


def _side(module: str) -> str:
  if module.startswith("learned_opt.tasks"):
    return "tasks"
  if module.startswith("learned_opt.meta_train"):
    return "meta_train"
  return "learned_opt"


def test_the_graph_covers_the_code():
  assert "learned_opt.meta_train.inner.loop" in MODULES and "learned_opt.tasks.base" in MODULES
  assert len(MODULES) > 60
  # The never-list test below must be able to fail: a known import is seen.
  assert ("learned_opt.tasks.base", False) in {(m, f) for m, f, _ in GRAPH["learned_opt.meta_train.inner.loop"]}


def test_no_arrow_on_the_never_list():
  bad = []
  for module, imports in GRAPH.items():
    for target, _, line in imports:
      if not target.startswith("learned_opt"):
        continue
      src, dst = _side(module), _side(target)
      # Optimizers never import tasks or meta-training; tasks import only tasks.
      if (src == "learned_opt" and dst != "learned_opt") or (src == "tasks" and dst != "tasks"):
        bad.append(f"{module}:{line} imports {target}")
  assert not bad, "never-list arrows:\n" + "\n".join(bad)


def test_no_import_cycle():
  edges = {m: sorted({t for t, _, _ in imps if t in MODULES and t != m}) for m, imps in GRAPH.items()}
  state, stack, cycles = {}, [], []

  def dfs(m):
    state[m] = "open"
    stack.append(m)
    for t in edges[m]:
      if state.get(t) == "open":
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        dfs(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(edges):
    if m not in state:
      dfs(m)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_inside_functions_are_only_optional_dependencies():
  bad = [f"{m}:{line} imports {t} inside a function"
         for m, imps in GRAPH.items() for t, in_fn, line in imps
         if in_fn and not any(t == ok or t.startswith(ok + ".") for ok in LAZY_OK)]
  assert not bad, "\n".join(bad)


def test_ray_is_imported_only_by_the_distributed_package():
  bad = [f"{m}:{line}" for m, imps in GRAPH.items() for t, in_fn, line in imps
         if t.split(".")[0] == "ray" and not in_fn
         and not m.startswith("learned_opt.meta_train.distributed")]
  assert not bad, f"modules importing ray at the top level outside distributed/: {bad}"


def test_import_learned_opt_loads_only_what_an_optax_user_needs():
  code = ("import sys, learned_opt; print('\\n'.join(sorted(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.split()
  loaded = set(out)
  ours = sorted(m for m in loaded if m.startswith("learned_opt"))
  assert "learned_opt.registry" in loaded and "learned_opt.optax_adapter" in loaded
  forbidden = [m for m in loaded if m.startswith(("learned_opt.tasks", "learned_opt.meta_train",
                                                  "learned_opt.fused.kernel"))]
  assert not forbidden, f"import learned_opt loaded {forbidden}"
  heavy = [m for m in ("ray", "tensorflow_datasets", "matplotlib", "jax.experimental.pallas",
                       "tqdm", "tensorflow") if m in loaded]
  assert not heavy, f"import learned_opt loaded {heavy}"
  expected = {m for m in MODULES if _side(m) == "learned_opt"} - {"learned_opt.fused.kernel",
                                                                  "learned_opt._extras"}
  assert set(ours) == expected, (f"unexpected: {sorted(set(ours) - expected)}; "
                                 f"not loaded: {sorted(expected - set(ours))}")


@pytest.mark.parametrize("missing, extra", [("matplotlib", "plot"), ("ray", "ray")])
def test_a_missing_extra_names_the_pip_install(missing, extra, monkeypatch):
  from learned_opt import _extras
  monkeypatch.setitem(sys.modules, missing, None)  # import now raises ImportError
  with pytest.raises(ImportError, match=rf"pip install 'lopt\[{extra}\]'"):
    _extras.require(missing, purpose="this test")
