"""The package's layers: lower layers never import higher ones (the quantization core knows no training,
methods or stage glue), checked on the source with ast so that a lazy import inside a function counts too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cpq_lib"
BOTTOM = {"artefacts", "config", "cpu_env", "devices", "errors", "fileio", "lock", "progress", "provenance", "runtime", "statistics",
          "data", "models"}
CORE = {"quant"}
TRAINING = {"train"}
METHODS = {"classpath", "allocation", "ptq", "sparse"}
TOP = {"cli", "deploy", "pipeline", "experiment", "notebook", "runner", "sweep", "plots", "tables", "jobs", "slurm"}
FORBIDDEN = {
    **{name: CORE | TRAINING | METHODS | TOP for name in BOTTOM},
    "quant": TRAINING | METHODS | TOP,
    "train": METHODS | TOP,
    **{name: TOP for name in METHODS},
}


def _component(module_path: Path) -> str:
    """The layer a source file belongs to; command-line entry points (``__main__``) are stage glue."""
    relative = module_path.relative_to(PACKAGE).with_suffix("")
    return "runner" if relative.name == "__main__" else relative.parts[0]


def _imported_components(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    depth = len(path.relative_to(PACKAGE).parts) - 1  # folders below cpq_lib
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("cpq_lib."):
                found.add(node.module.split(".")[1])
            elif node.level > 0:
                up = node.level - 1
                if up > depth:
                    continue
                base = list(path.relative_to(PACKAGE).parts[:depth - up]) if up <= depth else []
                target = base + (node.module.split(".") if node.module else [])
                if target:
                    found.add(target[0])
                else:  # "from .. import x": the names are the components
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("cpq_lib."))
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    component = _component(path)
    bad = _imported_components(path) & FORBIDDEN.get(component, set())
    assert not bad, f"{path.relative_to(PACKAGE)} ({component}) imports {sorted(bad)}"


def test_the_checker_sees_relative_imports():
    assert "train" in _imported_components(PACKAGE / "ptq" / "sweep.py")
    assert "quant" in _imported_components(PACKAGE / "classpath" / "scoring.py")


def test_every_module_has_a_layer():
    components = {_component(path) for path in SOURCES} - {"__init__"}
    unplaced = components - (BOTTOM | CORE | TRAINING | METHODS | TOP)
    assert not unplaced, f"modules in no layer: {sorted(unplaced)} (add them to tests/test_layers.py)"
