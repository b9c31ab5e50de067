"""One experiment end to end on the quick tier: the record, when the test split is read, resumption."""

import json
import shutil

import pytest

from cpq_lib import experiment
from cpq_lib.config import make_config
from cpq_lib.experiment import BEFORE, RECORD, SEARCH, run_experiment, tidy_row
from helpers import allocator_params


@pytest.fixture()
def run_dir(tmp_path, quick_baseline_dir):
    shutil.copytree(quick_baseline_dir, tmp_path / "shared" / "baseline")
    return tmp_path


def _config(**overrides):
    return make_config("quick", {"allocation.method": "classpath", "allocation.sparsities": [0.5],
                                 "refine.epochs": 1, **overrides})


def test_record_holds_plan_metrics_accuracies_and_cost(run_dir, monkeypatch):
    import cpq_lib.data as data_module

    events = []
    real_part, real_allocate, real_train = data_module.DataBundle.part, experiment.allocate, experiment.train_model
    monkeypatch.setattr(data_module.DataBundle, "part",
                        lambda self, name: (events.append("test") if name == "test" else None) or real_part(self, name))
    monkeypatch.setattr(experiment, "allocate", lambda *a, **k: events.append("search") or real_allocate(*a, **k))
    monkeypatch.setattr(experiment, "train_model", lambda *a, **k: events.append("refine") or real_train(*a, **k))
    record = run_experiment(_config(), run_dir / "run", shared_dir=run_dir / "shared", progress=False)
    # the test split is read only in the final report, after the search and the refinement
    assert events.index("search") < events.index("refine") < events.index("test")
    assert "test" not in events[:events.index("refine")]
    results = record["results"]
    assert results["allocator"] == "classpath" and results["target"]["label"] == "W2A2"
    assert results["average_bits"] <= 2.06 + 1e-9 and results["metrics"]["avg_weight_bits"] == pytest.approx(results["average_bits"])
    for stage in ("before_refinement", "after_refinement"):
        assert {"val_accuracy", "test_accuracy", "per_class_test_accuracy"} <= set(results[stage])
    assert results["search"]["cost"]["evaluations"] > 10 and results["search"]["details"]["sparsity"] == 0.5
    assert len(results["refinement"]["history"]) == 1
    assert record["config"]["allocation"]["method"] == "classpath" and record["seed"] == 0
    row = tidy_row(record)
    assert row["test_after"] == results["after_refinement"]["test_accuracy"] and row["sparsity"] == 0.5
    # the pre-refinement state is the plan the search chose
    assert results["search"]["accuracy"] == pytest.approx(results["before_refinement"]["val_accuracy"])


def test_a_stopped_run_resumes_without_searching_again(run_dir, monkeypatch):
    config = _config()
    first = run_experiment(config, run_dir / "run", shared_dir=run_dir / "shared", progress=False)
    (run_dir / "run" / RECORD).unlink()  # as if killed after refinement, before the record
    assert (run_dir / "run" / SEARCH).is_file() and (run_dir / "run" / BEFORE).is_file()
    monkeypatch.setattr(experiment, "allocate", lambda *a, **k: pytest.fail("searched again"))
    again = run_experiment(config, run_dir / "run", shared_dir=run_dir / "shared", progress=False)
    for stage in ("before_refinement", "after_refinement"):
        assert again["results"][stage] == first["results"][stage]
    assert json.loads((run_dir / "run" / RECORD).read_text())["results"]["plan"] == first["results"]["plan"]
    # a finished run is only read
    monkeypatch.setattr(experiment, "train_model", lambda *a, **k: pytest.fail("refined again"))
    assert run_experiment(config, run_dir / "run", progress=False)["results"] == again["results"]


def test_a_run_folder_of_another_configuration_is_refused_or_remade(run_dir, monkeypatch):
    from cpq_lib.artefacts import ArtefactMismatchError
    from cpq_lib.experiment import TIDY_COLUMNS

    first = _config(**{"refine.epochs": 0})
    record = run_experiment(first, run_dir / "run", shared_dir=run_dir / "shared", progress=False)
    assert set(tidy_row(record)) == set(TIDY_COLUMNS)
    other = _config(**{"refine.epochs": 0, "allocation.sparsities": [0.25]})
    with pytest.raises(ArtefactMismatchError, match=r"allocation.sparsities: \[0.5\] -> \[0.25\]"):
        run_experiment(other, run_dir / "run", shared_dir=run_dir / "shared", progress=False)
    assert json.loads((run_dir / "run" / RECORD).read_text()) == record  # untouched
    # unfinished stages of another configuration are remade, not reused (the search used to be read back)
    (run_dir / "run" / RECORD).unlink()
    searched = []
    real_allocate = experiment.allocate
    monkeypatch.setattr(experiment, "allocate", lambda *a, **k: searched.append(k.get("sparsities")) or real_allocate(*a, **k))
    again = run_experiment(other, run_dir / "run", shared_dir=run_dir / "shared", progress=False)
    assert searched == [[0.25]] and again["results"]["search"]["details"]["sparsity"] == 0.25
    # a cache folder: a finished run of another configuration is run again
    remade = run_experiment(first, run_dir / "run", shared_dir=run_dir / "shared", progress=False, stale="recompute")
    assert searched == [[0.25], [0.5]] and remade["results"]["plan"] == record["results"]["plan"]
    with pytest.raises(ValueError, match="stale: 'ignore' is not allowed"):
        run_experiment(first, run_dir / "run", progress=False, stale="ignore")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", allocator_params(__import__("cpq_lib.allocation", fromlist=["ALLOCATORS"]).ALLOCATORS))
def test_every_allocator_runs_end_to_end_on_cuda(run_dir, method):
    """Search (bit bookkeeping on the CPU, quantizers on the GPU), refinement and report on a CUDA device."""
    config = _config(**{"allocation.method": method, "device": "cuda"})
    results = run_experiment(config, run_dir / method, shared_dir=run_dir / "shared", progress=False)["results"]
    assert results["average_bits"] <= 2.06 + 1e-9
    assert results["search"]["accuracy"] == pytest.approx(results["before_refinement"]["val_accuracy"])
    assert results["after_refinement"]["val_accuracy"] > results["before_refinement"]["val_accuracy"]
