"""Stored notebooks: parameters first, executed with `quick`, clean, with compared outputs (nbval runs them)."""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MACHINE_PATH = re.compile(r"(/work/|/home/|/root/|/tmp/|/usr/|/opt/|/Users/|[A-Z]:\\\\)")


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "01_baseline.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebook_hygiene(path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    for name in ("profile", "seed", "data_root", "device", "run_dir", "figures_dir"):
        assert re.search(rf"^{name} = ", code[0].source, re.M), f"parameter {name} missing"
    assert 'profile = "quick"' in code[0].source
    assert any(c.source.startswith("# NBVAL_CHECK_OUTPUT") for c in code), "no output is compared by nbval"
    assert all(c.execution_count is not None for c in code), "stored notebooks must be executed"
    injected = [c for c in code if "injected-parameters" in c.metadata.get("tags", [])]
    assert all('profile = "quick"' in c.source for c in injected), "stored outputs must come from the quick profile"
    for cell in code:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", f"error output stored in {path.name}"
            assert output.get("name") != "stderr", f"warning or log text stored in {path.name}: {output.get('text', '')[:200]}"
            assert "application/vnd.jupyter.widget-view+json" not in output.get("data", {}), \
                f"progress-bar widget stored in {path.name}"
            text = output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
            assert not MACHINE_PATH.search(text), f"machine path in an output of {path.name}: {text[:200]}"
    assert "papermill" not in notebook.metadata
