"""kernels/ is Triton kernels only: it imports torch, triton and itself, nothing of the engine."""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
# The standard library is allowed; anything else must be torch or triton.
ALLOWED = {"torch", "triton", "__future__", "typing", "math", "dataclasses", "functools", "os"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def test_kernels_import_nothing_of_the_engine():
    files = sorted(KERNELS.glob("*.py"))
    assert files, KERNELS
    for path in files:
        outside = imported_modules(path) - ALLOWED - {"."}
        assert not outside, f"{path.name} imports {sorted(outside)}"


def test_relative_imports_stay_inside_kernels():
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name} reaches outside kernels/ with a level-{node.level} import"
