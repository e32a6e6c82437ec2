"""Dependencies run one way: no module of esen_train imports one of a higher layer.

Layers, lowest first (ARCHITECTURE.md):
  0  the package root (esen_train/__init__.py), progress.py, plots.py, config_loading.py:
     depend on nothing
  1  data/
  2  model/      (also the model.pt format: model/model_file.py)
  3  engine/
  4  evaluation/
  5  fairchem/, launch/, calculator.py (each imports only lower layers)
  6  cli/        (every command; nothing imports it)
A module may import its own package and any lower layer, never a higher one or another
package of its own layer. Imports inside functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "esen_train"
LAYERS = {
    "": 0, "progress": 0, "plots": 0, "config_loading": 0,
    "data": 1,
    "model": 2,
    "engine": 3,
    "evaluation": 4,
    "fairchem": 5, "launch": 5, "calculator": 5,
    "cli": 6,
}


def unit_of(module: str) -> str:
    """`esen_train.engine.fit` -> "engine"; `esen_train` -> "" (the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every esen_train import in a source file; `from esen_train import X`
    counts as importing esen_train.X when X is a module of the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "esen_train":
                found += [(node.lineno, f"esen_train.{alias.name}" if alias.name in LAYERS else "esen_train")
                          for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, module) for line, module in found if module == "esen_train" or module.startswith("esen_train.")]


def violations(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        unit = relative.parts[0] if len(relative.parts) > 1 else relative.stem.replace("__init__", "")
        if unit not in LAYERS:
            problems.append(f"{relative}: {unit!r} has no layer in this test's LAYERS")
            continue
        for line, module in imported_modules(path):
            target = unit_of(module)
            if target not in LAYERS:
                problems.append(f"{relative}:{line} imports {module}, which has no layer in LAYERS")
            elif target != unit and target != "" and LAYERS[target] >= LAYERS[unit]:
                problems.append(f"{relative}:{line} ({unit}, layer {LAYERS[unit]}) imports {module} "
                                f"({target}, layer {LAYERS[target]})")
    return problems


def test_no_module_imports_a_higher_layer():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize("source, unit, expected", [
    ("from esen_train.evaluation.plots import plot_parity\n", "engine", "imports esen_train.evaluation.plots"),
    ("def f():\n    import esen_train.cli\n", "model", "imports esen_train.cli"),
    ("from esen_train import cli\n", "data", "imports esen_train.cli"),
    ("from esen_train.launch.profile import load_profile\n", "fairchem", "imports esen_train.launch.profile"),
])
def test_an_upward_import_is_found(tmp_path, source, unit, expected):
    (tmp_path / unit).mkdir()
    (tmp_path / unit / "module.py").write_text(source)
    (tmp_path / unit / "fine.py").write_text("from esen_train.progress import ConsoleProgress\nimport esen_train\n")
    assert [problem for problem in violations(tmp_path) if expected in problem] != []
    assert not any("fine.py" in problem for problem in violations(tmp_path))
