"""cpq_lib.notebook: lazy data, committed results that refuse other parameters, a results-only context."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cpq_lib import notebook

REPO = Path(__file__).resolve().parent.parent


def test_setup_loads_no_data_until_asked(tmp_path, monkeypatch):
    calls = []
    real = notebook.load_data
    monkeypatch.setattr(notebook, "load_data", lambda config: calls.append(config.profile) or real(config))
    ctx = notebook.setup("quick", run_dir=str(tmp_path / "runs"), figures_dir=str(tmp_path / "figures"))
    assert calls == []
    assert ctx.data.num_classes == 10 and calls == ["quick"]
    assert ctx.data is ctx.data and calls == ["quick"]  # loaded once


FRAME = pd.DataFrame({"allocator": ["uniform", "classpath", "uniform"], "target": ["W2A2"] * 3, "seed": [0, 0, 1]})


def test_select_committed_filters_and_says_so(capsys):
    chosen = notebook.select_committed(FRAME, {"allocator": ["uniform"], "target": None, "seed": [1]}, "x/allocators.csv")
    assert chosen.to_dict("records") == [{"allocator": "uniform", "target": "W2A2", "seed": 1}]
    assert "committed results (1 of 3 rows of allocators.csv)" in capsys.readouterr().out


def test_select_committed_refuses_values_it_does_not_hold():
    with pytest.raises(ValueError, match=r"seed \[2\].*allocators.csv.*\[0, 1\].*rerun=True"):
        notebook.select_committed(FRAME, {"seed": [0, 2]}, "allocators.csv")


def test_committed_runs_reads_the_rows_asked_for_and_their_records(tmp_path):
    frame = FRAME.assign(run=[f"run-{i}" for i in range(len(FRAME))])
    frame.to_csv(tmp_path / "hessian.csv", index=False)
    (tmp_path / "records").mkdir()
    for run in frame["run"][:2]:  # the third run's record is not committed
        (tmp_path / "records" / f"{run}.json").write_text(json.dumps({"run": run}))
    chosen, records = notebook.committed_runs(tmp_path / "hessian.csv", tmp_path / "records", {"seed": [0]})
    assert list(chosen["seed"]) == [0] * (FRAME["seed"] == 0).sum()
    assert records == {run: {"run": run} for run in chosen["run"] if run in ("run-0", "run-1")}
    assert notebook.committed_runs(tmp_path / "missing.csv", tmp_path / "records") == (None, {})


def test_resolve_parameters_defaults_committed_and_refusal():
    defaults = {"sparsity": 0.8, "fractions": [0.5, 1.0]}
    assert notebook.resolve_parameters({"sparsity": None, "fractions": None}, defaults, None) == defaults
    assert notebook.resolve_parameters({"sparsity": 0.5, "fractions": None}, defaults, None) == {"sparsity": 0.5, "fractions": [0.5, 1.0]}
    made = {"sparsity": 0.9, "fractions": (0.5, 1.0)}
    assert notebook.resolve_parameters({"sparsity": None, "fractions": [0.5, 1.0]}, defaults, made) == made
    with pytest.raises(ValueError, match=r"sparsity=0.8 \(committed: 0.9\).*summary.json"):
        notebook.resolve_parameters({"sparsity": 0.8, "fractions": None}, defaults, made, "focused/summary.json")


def test_committed_record_finds_the_newest(tmp_path, monkeypatch):
    folder = tmp_path / "results" / "cifar10" / "records"
    folder.mkdir(parents=True)
    for key, created in (("aaaa", "2026-01-01"), ("bbbb", "2026-02-01")):
        (folder / f"uniform-W2-A2-s0-{key}.json").write_text(json.dumps({"created": created, "key": key}))
    (folder / "uniform_x-W2-A2-s0-cccc.json").write_text(json.dumps({"created": "2027-01-01"}))
    monkeypatch.chdir(tmp_path / "results")  # the notebooks' folder is a sibling of results/
    record, path = notebook.committed_record("cifar10", "uniform", 2.0, 2, 0)
    assert record["key"] == "bbbb" and path.name.endswith("bbbb.json")
    assert notebook.committed_record("cifar10", "uniform", 3.0, 3, 0) is None


def test_results_setup_refuses_an_unknown_results_folder(tmp_path, monkeypatch):
    (tmp_path / "results" / "cifar10").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    with pytest.raises(FileNotFoundError, match=r"'cifar100'.*\['cifar10'\]"):
        notebook.results_setup("cifar100")
    ctx = notebook.results_setup("cifar10", figures_dir=str(tmp_path / "figures"))
    assert ctx.results_dir == Path("..") / "results" / "cifar10"


def test_save_table_writes_booktabs(tmp_path):
    outputs = notebook.Outputs(tmp_path)
    path = outputs.save_table(pd.DataFrame({"test (%)": [84.24]}, index=["uniform"]), "t", caption="A caption.")
    text = path.read_text()
    assert "\\toprule" in text and "\\bottomrule" in text and "84.2" in text and "\\label{tab:t}" in text and "\\%" in text


POISON = """
import cpq_lib.pipeline as pipeline, cpq_lib.notebook as notebook, cpq_lib.models as models
def refuse(*args, **kwargs):
    raise RuntimeError("the results notebook touched the data set or a model")
pipeline.load_data = notebook.load_data = refuse
models.load_pretrained = pipeline.load_pretrained = refuse
"""


@pytest.mark.slow
def test_results_notebook_needs_no_data_or_model(tmp_path):
    """10_results runs with data loading and model loading made to fail, and no CIFAR-10 anywhere."""
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-poison.py").write_text(POISON, encoding="utf-8")
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython"), "CPQ_FIGURES_DIR": str(tmp_path / "figures"),
           "CPQ_SHARED_CIFAR10": str(tmp_path / "absent.zip"), "TQDM_DISABLE": "1"}
    code = ("import papermill; papermill.execute_notebook('10_results.ipynb', %r, cwd='.', kernel_name='python3', "
            "progress_bar=False)" % str(tmp_path / "out.ipynb"))
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO / "notebooks", env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    written = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"10_accuracy_vs_bits.pdf", "10_ptqsl_granularity.png", "10_focused_compression.png", "10_allocators.tex"} <= written
