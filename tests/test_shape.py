"""The size limits of the code's shape, read with ``ast``: no function in ``hfquant/`` takes more than 8 parameters
(``self``/``cls`` not counted) or is longer than 60 lines, and no module is longer than 400 lines.

One exception, by kind: a ``@triton.jit`` kernel's parameters are its launch interface (pointers, sizes, strides and
compile-time block sizes; Triton has no struct arguments), so their count is not limited.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "hfquant"
MAX_PARAMS, MAX_FUNCTION_LINES, MAX_FILE_LINES = 8, 60, 400


def _is_triton_kernel(fn: ast.FunctionDef) -> bool:
    return any(ast.unparse(d).split("(")[0] in ("triton.jit", "jit") for d in fn.decorator_list)


def _params(fn) -> int:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args)]
    n = len(names) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    return n - (1 if names and names[0] in ("self", "cls") else 0)


def violations(root: Path) -> list[str]:
    """Every function or file over the limits under ``root``, one line each."""
    out = []
    for path in sorted(root.rglob("*.py")):
        src = path.read_text()
        where = path.relative_to(root.parent)
        if len(src.splitlines()) > MAX_FILE_LINES:
            out.append(f"{where}: {len(src.splitlines())} lines (at most {MAX_FILE_LINES})")
        for fn in ast.walk(ast.parse(src)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                out.append(f"{where}:{fn.lineno} {fn.name}: {lines} lines (at most {MAX_FUNCTION_LINES})")
            if _params(fn) > MAX_PARAMS and not _is_triton_kernel(fn):
                out.append(f"{where}:{fn.lineno} {fn.name}: {_params(fn)} parameters (at most {MAX_PARAMS})")
    return out


def test_the_package_keeps_the_size_limits():
    assert violations(ROOT) == []


def test_the_check_catches_a_long_function_many_parameters_and_a_long_file(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "a.py").write_text(f"def long():\n{body}\n\n\ndef wide(a, b, c, d, e, f, g, h, i):\n    pass\n\n\n"
                              "class K:\n    def ok(self, a, b, c, d, e, f, g, h):\n        pass\n"
                              + "\n" * MAX_FILE_LINES)
    (pkg / "k.py").write_text("import triton\n\n\n@triton.jit\ndef kernel(a, b, c, d, e, f, g, h, i, j):\n    pass\n")
    found = violations(pkg)
    assert any("a.py:1 long: 61 lines" in v for v in found)
    assert any("wide: 9 parameters" in v for v in found)
    assert any(v.endswith(f"lines (at most {MAX_FILE_LINES})") and "a.py" in v for v in found)
    assert not any("ok:" in v or "kernel" in v for v in found)
