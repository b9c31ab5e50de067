import shutil

import nbformat
import pytest

from cpq_lib import runner


def test_selection_and_unknown_selection():
    assert [p.name for p in runner.notebook_paths(["01"])] == ["01_baseline.ipynb"]
    with pytest.raises(SystemExit, match="no notebook matches"):
        runner.notebook_paths(["99"])


def test_bad_arguments_exit_with_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--profile", "cifar10", "--store"])
    assert exit_info.value.code == 2 and "--store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--data-root", str(tmp_path / "missing.zip")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--profile", "huge"])


def test_clean_stored_notebook_drops_paths_and_timings(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["papermill"] = {"input_path": "/somewhere/x.ipynb"}
    cell = nbformat.v4.new_code_cell("1")
    cell.metadata["papermill"] = {"duration": 1.0}
    cell.metadata["execution"] = {"iopub.status.busy": "2026"}
    injected = nbformat.v4.new_code_cell("profile = 'quick'", metadata={"tags": ["injected-parameters"]})
    notebook.cells += [cell, injected]
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    path = tmp_path / "n.ipynb"
    nbformat.write(notebook, path)
    runner.clean_stored_notebook(path)
    cleaned = nbformat.read(path, as_version=4)
    assert "papermill" not in cleaned.metadata and "widgets" not in cleaned.metadata
    assert cleaned.cells[0].metadata == {} and len(cleaned.cells) == 1  # the injected cell is gone


@pytest.mark.parametrize("path", runner.notebook_paths(None), ids=lambda p: p.name)
def test_stored_notebooks_run_what_their_parameters_cell_says(path):
    """No injected cell re-sets the parameters after the reader's edit; the stored run used the defaults."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell is the parameters cell"
    assert not [c for c in code if "injected-parameters" in c.metadata.get("tags", [])]
    defaults: dict = {}
    exec(code[0].source, {}, defaults)  # noqa: S102 - the repository's own notebook
    if "results" in defaults:  # the results notebook reads committed results, whatever the profile
        assert defaults["results"] == "cifar10" and "profile" not in defaults
    else:
        assert (defaults["profile"], defaults["seed"], defaults["device"]) == ("quick", 0, "auto")


@pytest.mark.slow
def test_runner_executes_notebook_and_writes_figures(tmp_path, capfd, quick_baseline_dir):
    shutil.copytree(quick_baseline_dir, tmp_path / "run" / "baseline")  # trained once per session (same numbers)
    timings = runner.run("quick", None, "cpu", tmp_path / "run", tmp_path / "figures", ["01"])
    assert [name for name, _ in timings] == ["01_baseline.ipynb"]
    assert (tmp_path / "run" / "notebooks" / "01_baseline.ipynb").is_file()
    assert (tmp_path / "run" / "01_baseline.json").is_file()
    written = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert written == ["01_learning_curve.pdf", "01_learning_curve.png", "01_per_class_accuracy.pdf", "01_per_class_accuracy.png"]
    committed = runner.REPO / "figures" / "quick"  # a fresh training run renders the committed figures byte for byte
    assert [name for name in written if (tmp_path / "figures" / name).read_bytes() != (committed / name).read_bytes()] == []
    assert "without encryption" not in capfd.readouterr().err  # the kernel is started with transport keys


def test_only_needs_at_least_one_prefix(capsys):
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--only"])
    assert exit_info.value.code == 2 and "--only" in capsys.readouterr().err


def test_default_folders_are_not_injected_and_environment_is_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("CPQ_RUN_DIR", "/somewhere")
    parameters = runner.notebook_parameters("quick", 0, "cpu", None, runner.REPO / "runs" / "quick", runner.REPO / "figures" / "quick")
    assert parameters == {"profile": "quick", "seed": 0, "device": "cpu"}
    custom = runner.notebook_parameters("quick", 0, "cpu", None, tmp_path / "r", runner.REPO / "figures" / "quick")
    assert custom["run_dir"].endswith("/r") and "figures_dir" not in custom
    with runner.kernel_environment("quick"):
        import os

        assert "CPQ_RUN_DIR" not in os.environ and os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert os.environ["CPQ_RUN_DIR"] == "/somewhere"


def test_declared_parameters_are_the_parameters_cell_names():
    from cpq_lib.runner import NOTEBOOKS, declared_parameters

    assert {"profile", "seed", "device", "slurm", "allocators"} <= declared_parameters(NOTEBOOKS / "07_comparison.ipynb")
    results = declared_parameters(NOTEBOOKS / "10_results.ipynb")
    assert "results" in results and "profile" not in results  # the runner passes it no profile
