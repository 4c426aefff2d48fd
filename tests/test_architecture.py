"""The layering of README's "Architecture" section, read from the code's own imports with ``ast``.

Rules checked:
1. a module imports hfquant modules of its own layer or of layers below it, never above;
2. no import cycle between hfquant modules: neither among module-level imports, nor once the imports inside
   functions are added to them (a second graph: a function-level import runs later, but a cycle through it still
   ties the two modules together, and breaks when the function runs during the other module's import);
3. an import inside a function is either an optional heavy dependency (``OPTIONAL``), the Triton kernels
   module (it imports Triton), or in ``hfquant/__init__.py`` (keeps ``import hfquant`` to torch only), and
   it carries a comment saying why (on its line or the line above).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "hfquant"

# Bottom to top; README's "Architecture" section shows the same list.
LAYERS = ["core", "kernels", "nn", "config", "calibration", "eval", "mixed", "quantize", "formats",
          "integrations", "api", "app"]
OPTIONAL = {"triton", "matplotlib", "compressed_tensors", "datasets", "evaluate", "gguf", "onnx", "onnxruntime_genai", "onnx_ir", "lm_eval"}
LAZY_INTERNAL = {"hfquant.kernels.triton_kernels", "hfquant.core.gptq_triton"}  # import Triton, an optional dependency


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """Index in ``LAYERS`` (``None`` for ``hfquant`` itself and ``hfquant.__main__``, which sit above all)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else -1


def _targets(node, modules: set[str]) -> list[str]:
    """The hfquant modules an import statement loads (``from pkg import submodule`` counts the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "hfquant"]
    mod = node.module or ""
    if mod.split(".")[0] != "hfquant":
        return []
    subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
    if mod == "hfquant" and all(a.name == "__version__" for a in node.names):
        return []  # the version string: hfquant/__init__.py imports nothing at module level
    return subs if len(subs) == len(node.names) else [mod] + subs


def scan(root: Path) -> list[str]:
    """Every violation of the three rules under the package folder ``root``, one line each."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}  # module-level imports
    lazy: dict[str, set[str]] = {m: set() for m in modules}  # imports inside functions
    for mod, path in files.items():
        src = path.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        in_function: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _targets(node, modules)
            where = f"{path.relative_to(root.parent)}:{node.lineno}"
            if id(node) in in_function:
                top = (node.module or "") if isinstance(node, ast.ImportFrom) else node.names[0].name
                allowed = (top.split(".")[0] in OPTIONAL or mod == "hfquant"
                           or set(targets) & LAZY_INTERNAL)
                above = node.lineno - 2  # a comment may head a run of imports
                while above > 0 and lines[above].strip().startswith(("from ", "import ")):
                    above -= 1
                commented = "#" in lines[node.lineno - 1] or lines[above].strip().startswith("#")
                if not allowed:
                    problems.append(f"{where}: import of {top} inside a function")
                elif not commented:
                    problems.append(f"{where}: import inside a function without a comment saying why")
                lazy[mod].update(t for t in targets if t != mod)
                continue
            for t in targets:
                if t == mod:
                    continue
                graph[mod].add(t)
                lo, hi = layer_of(mod), layer_of(t)
                if hi == -1 or lo == -1:
                    problems.append(f"{where}: {mod} or {t} is in no layer of LAYERS")
                elif lo is not None and hi is not None and hi > lo:
                    problems.append(f"{where}: {mod} ({LAYERS[lo]}) imports {t} ({LAYERS[hi]}), a layer above it")
                elif lo is not None and hi is None:
                    problems.append(f"{where}: {mod} imports the top-level package {t}")
    module_level = _cycles(graph)
    problems += [f"import cycle: {' -> '.join(c)}" for c in module_level]
    both = {m: graph[m] | lazy[m] for m in modules}
    problems += [f"import cycle through an import inside a function: {' -> '.join(c)}" for c in _cycles(both)
                 if c not in module_level]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_point_down_without_cycles():
    assert scan(ROOT) == []


def test_every_subpackage_is_a_layer():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py")} - {"__init__", "__main__"}
    assert folders | modules <= set(LAYERS) | {"data"}, sorted((folders | modules) - set(LAYERS))


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "hfquant"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return root


@pytest.mark.parametrize("files, expected", [
    ({"core/a.py": "from hfquant.app import cli\n", "app/cli.py": ""}, "a layer above it"),
    ({"core/a.py": "from hfquant.core import b\n", "core/b.py": "from hfquant.core import a\n"}, "import cycle"),
    ({"core/a.py": "from hfquant.core import b\n", "core/b.py": "def f():\n    from hfquant.core import a\n"},
     "import cycle through an import inside a function"),
    ({"nn/a.py": "def f():\n    from hfquant.core import b\n", "core/b.py": ""}, "inside a function"),
    ({"nn/a.py": "def f():\n    import matplotlib\n"}, "without a comment"),
    ({"nn/a.py": "import hfquant\n"}, "top-level package"),
])
def test_planted_violations_are_caught(tmp_path, files, expected):
    problems = scan(_plant(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_a_cycle_through_an_allowed_function_level_import_is_caught(tmp_path):
    """The layout hfquant.kernels had: ``common`` imports the Triton kernels inside a function (allowed: they import
    Triton, an optional dependency; commented), and ``triton_kernels`` imports ``common`` at module level. No rule
    about the imports themselves is broken, and the module-level graph has no cycle; the second graph has one."""
    root = _plant(tmp_path, {
        "kernels/common.py": ("def triton_kernels():\n"
                              "    # Triton is optional: imported on the first CUDA call\n"
                              "    from hfquant.kernels import triton_kernels as module\n"
                              "    return module\n"),
        "kernels/triton_kernels.py": "from hfquant.kernels.common import helper\n",
    })
    assert scan(root) == ["import cycle through an import inside a function: "
                          "hfquant.kernels.common -> hfquant.kernels.triton_kernels"]
    # The fix hfquant took: what the Triton kernels need moved to a module that imports neither.
    (root / "kernels" / "operands.py").write_text("def helper():\n    pass\n")
    (root / "kernels" / "triton_kernels.py").write_text("from hfquant.kernels.operands import helper\n")
    assert scan(root) == []


def test_a_module_level_cycle_is_reported_once(tmp_path):
    root = _plant(tmp_path, {"core/a.py": "from hfquant.core import b\n", "core/b.py": "from hfquant.core import a\n"})
    assert scan(root) == ["import cycle: hfquant.core.a -> hfquant.core.b"]


def test_the_real_tree_would_fail_with_an_upward_import(tmp_path):
    """The same scan over a copy of hfquant with one upward import added to a core module."""
    import shutil

    copy = tmp_path / "hfquant"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    target = copy / "core" / "grids.py"
    target.write_text(target.read_text() + "\nfrom hfquant.quantize import entry  # planted\n")
    assert any("core.grids" in p and "a layer above it" in p for p in scan(copy))
