"""Sweeps: grid parsing, run ids, and resumption after SIGKILL without redoing finished runs."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from cpq_lib.errors import ConfigError
from cpq_lib.sweep import combinations, parse_axis, run_id, run_sweep


def test_axes_and_combinations():
    assert parse_axis("allocation.method=uniform,classpath") == (("allocation.method",), [("uniform",), ("classpath",)])
    fields, values = parse_axis("allocation.weight_bits,allocation.act_bits=2:2,3:3")
    assert fields == ("allocation.weight_bits", "allocation.act_bits") and values == [(2, 2), (3, 3)]
    runs = combinations([parse_axis("seed=0,1"), (fields, values)])
    assert len(runs) == 4 and runs[1] == {"seed": 0, "allocation.weight_bits": 3, "allocation.act_bits": 3}
    assert run_id({"allocation.method": "uniform", "allocation.weight_bits": 2, "allocation.act_bits": 2, "seed": 1}) == "uniform-W2-A2-s1"
    assert run_id({"allocation.method": "uniform", "refine.epochs": 15, "data.root": "/x"}) != run_id({"allocation.method": "uniform"})
    assert run_id({"data.root": "/a"}) == run_id({"data.root": "/b"})  # where the data lives is not the run
    for bad, message in (("seed", "FIELD=V1"), ("a,b=1:2,3", "needs 2 parts")):
        with pytest.raises(ConfigError, match=message):
            parse_axis(bad)


def test_a_run_folder_made_with_another_configuration_is_refused(tmp_path, quick_baseline_dir):
    from cpq_lib.artefacts import ArtefactMismatchError
    from cpq_lib.experiment import RecordError

    shutil.copytree(quick_baseline_dir, tmp_path / "shared" / "baseline")
    axes = [parse_axis("allocation.method=uniform")]
    run_sweep("quick", axes, tmp_path, {"refine.epochs": 0}, progress=False)
    (record,) = (tmp_path / "runs").glob("uniform*/record.json")
    text = record.read_text()
    record.write_text(text.replace('"calibration_images": 512', '"calibration_images": 100'))  # made with other settings
    with pytest.raises(ArtefactMismatchError, match=r"allocation.calibration_images: 100 -> 512.*use another --out"):
        run_sweep("quick", axes, tmp_path, {"refine.epochs": 0}, progress=False)
    saved = json.loads(text)
    record.write_text(json.dumps({**saved, "artefact_key": {**saved["artefact_key"], "code": "0" * 16}}))  # other code
    with pytest.raises(ArtefactMismatchError, match="code fingerprint: 0000000000000000 -> "):
        run_sweep("quick", axes, tmp_path, {"refine.epochs": 0}, progress=False)
    record.write_text(json.dumps({k: v for k, v in saved.items() if k != "artefact_key"}))  # an older version's record
    with pytest.raises(ArtefactMismatchError, match="carries no key"):
        run_sweep("quick", axes, tmp_path, {"refine.epochs": 0}, progress=False)
    frame = run_sweep("quick", axes, tmp_path, {"refine.epochs": 0}, progress=False, stale="recompute")  # a cache: run again
    assert json.loads(record.read_text())["artefact_key"] == saved["artefact_key"] and len(frame) == 1
    assert frame.iloc[0]["val_after"] == saved["results"]["after_refinement"]["val_accuracy"]
    # damaged records name the file and what is wrong, before any job starts
    for content, message in ((text[: len(text) // 2], "is not valid JSON"), ("{}", r"has no \['config', 'results'\]")):
        record.write_text(content)
        with pytest.raises(RecordError, match=re.escape(str(record)) + ".*" + message):
            run_sweep("quick", axes, tmp_path, {"refine.epochs": 0}, progress=False)
    record.unlink()
    record.mkdir()
    with pytest.raises(RecordError, match="is a folder where a run's record file belongs"):
        run_sweep("quick", axes, tmp_path, {"refine.epochs": 0}, progress=False)
    record.rmdir()
    with pytest.raises(ConfigError, match="stale: 'keep' is not allowed"):
        run_sweep("quick", axes, tmp_path, {"refine.epochs": 0}, progress=False, stale="keep")


def test_a_sweep_returns_its_own_runs_not_others_in_the_folder(tmp_path, quick_baseline_dir):
    shutil.copytree(quick_baseline_dir, tmp_path / "shared" / "baseline")
    first = run_sweep("quick", [parse_axis("allocation.method=uniform")], tmp_path, {"refine.epochs": 0}, progress=False)
    # the same grid with other base settings (as a notebook's cache folder sees when its parameters change)
    second = run_sweep("quick", [parse_axis("allocation.method=uniform")], tmp_path,
                       {"refine.epochs": 0, "allocation.weight_bits": 3}, progress=False)
    assert len(first) == len(second) == 1 and first["run"][0] != second["run"][0]
    assert second["average_bits"][0] > 2.5
    listed = pd.read_csv(tmp_path / "results.csv")
    assert sorted(listed["run"]) == sorted([first["run"][0], second["run"][0]])  # results.csv keeps every run


def test_a_sweep_without_finished_runs_writes_a_readable_results_table(tmp_path):
    from cpq_lib.experiment import TIDY_COLUMNS
    from cpq_lib.sweep import write_results

    (tmp_path / "runs").mkdir()
    write_results(tmp_path)
    table = pd.read_csv(tmp_path / "results.csv")
    assert table.empty and list(table.columns) == ["run", *TIDY_COLUMNS]


KILLER = textwrap.dedent('''
    import os, signal, sys
    import cpq_lib.train.trainer as trainer
    from cpq_lib.sweep import main

    real_save = trainer.atomic_torch_save

    def save_then_die(payload, path):
        real_save(payload, path)
        if "random" in str(path) and payload.get("epoch") == 1:  # second run, first refinement epoch saved
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.atomic_torch_save = save_then_die
    main(sys.argv[1:])
''')
GRID = ["--grid", "allocation.method=uniform,random", "--set", "refine.epochs=2", "--no-progress", "--executor", "inline"]


def _sweep(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=dict(os.environ))


@pytest.mark.slow
def test_sweep_resumes_after_sigkill_without_redoing_finished_runs(tmp_path, quick_baseline_dir):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for out in (killed, clean):
        shutil.copytree(quick_baseline_dir, out / "shared" / "baseline")
    first = _sweep(["-c", KILLER, "--out", str(killed), *GRID], tmp_path)
    assert first.returncode == -9, first.stderr[-2000:]
    (finished,) = (killed / "runs").glob("uniform*/record.json")
    (interrupted,) = (killed / "runs").glob("random*")
    stamp, content = finished.stat().st_mtime_ns, finished.read_bytes()
    assert not (interrupted / "record.json").exists() and (interrupted / "refine_state.pt").is_file()
    second = _sweep(["-m", "cpq_lib.sweep", "--out", str(killed), *GRID], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert finished.stat().st_mtime_ns == stamp and finished.read_bytes() == content  # not redone
    log = [json.loads(line) for line in (interrupted / "refine_log.jsonl").read_text().splitlines() if line]
    assert [entry["epoch"] for entry in log] == [1, 2]  # epoch 1 once (before the kill), then resumed at 2
    assert _sweep(["-m", "cpq_lib.sweep", "--out", str(clean), *GRID], tmp_path).returncode == 0
    resumed, uninterrupted = (pd.read_csv(out / "results.csv") for out in (killed, clean))
    exact = ["run", "average_bits", "val_before", "test_before", "val_after", "test_after", "evaluations"]
    pd.testing.assert_frame_equal(resumed[exact], uninterrupted[exact])  # resumption changes no number
    assert len(resumed) == 2


LOCAL = ["--grid", "allocation.method=uniform,random", "--set", "refine.epochs=2", "--no-progress",
         "--executor", "local", "--parallel", "1"]


@pytest.mark.slow
def test_a_local_process_sweep_resumes_after_its_driver_is_killed(tmp_path, quick_baseline_dir):
    """The driver dies (SIGKILL) after the first run finished; its job processes live on. Started again,
    it skips the finished run, waits for (or redoes) the other one, and no run is computed twice."""
    out, clean = tmp_path / "killed", tmp_path / "clean"
    for folder in (out, clean):
        shutil.copytree(quick_baseline_dir, folder / "shared" / "baseline")
    driver = subprocess.Popen([sys.executable, "-m", "cpq_lib.sweep", "--out", str(out), *LOCAL], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = time.monotonic() + 300
    while not list((out / "runs").glob("*/record.json")):
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no run finished in 300 s"
        time.sleep(0.2)
    driver.kill()
    driver.wait()
    (finished,) = (out / "runs").glob("*/record.json")
    stamp, content = finished.stat().st_mtime_ns, finished.read_bytes()
    second = _sweep(["-m", "cpq_lib.sweep", "--out", str(out), *LOCAL], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert finished.stat().st_mtime_ns == stamp and finished.read_bytes() == content  # not redone
    for run in (out / "runs").iterdir():  # each refinement epoch ran once: no run was computed twice
        log = [json.loads(line) for line in (run / "refine_log.jsonl").read_text().splitlines() if line]
        assert [entry["epoch"] for entry in log] == [1, 2], run.name
    assert len(list((out / "jobs").glob("*_result.pkl"))) >= 2  # the runs went through job processes
    inline = [*LOCAL[:-4], "--executor", "inline"]
    assert _sweep(["-m", "cpq_lib.sweep", "--out", str(clean), *inline], tmp_path).returncode == 0
    resumed, uninterrupted = (pd.read_csv(folder / "results.csv") for folder in (out, clean))
    exact = ["run", "average_bits", "val_before", "test_before", "val_after", "test_after", "evaluations"]
    pd.testing.assert_frame_equal(resumed[exact], uninterrupted[exact])  # processes change no number
    assert len(resumed) == 2


def test_a_run_group_checkpoints_as_itself_so_a_requeued_job_resumes_the_same_runs(tmp_path):
    """On Slurm's time-limit signal submitit calls ``checkpoint`` and requeues what it returns: the
    same group with the same arguments, which skips finished records and resumes the interrupted run."""
    import pickle

    from submitit.helpers import Checkpointable, DelayedSubmission

    from cpq_lib.sweep import RunGroup, run_group

    runs = [({"seed": 0}, str(tmp_path / "a")), ({"seed": 1}, str(tmp_path / "b"))]
    assert isinstance(run_group, Checkpointable)
    again = run_group.checkpoint("quick", runs, str(tmp_path / "shared"), stale="refuse")
    assert isinstance(again, DelayedSubmission) and isinstance(again.function, RunGroup)
    assert again.args == ("quick", runs, str(tmp_path / "shared")) and again.kwargs == {"stale": "refuse"}
    assert isinstance(pickle.loads(pickle.dumps(run_group)), RunGroup)  # pickled by reference into job folders


@pytest.mark.slow
def test_a_run_with_two_ranks_refines_data_parallel_and_writes_its_record_once(tmp_path, quick_baseline_dir):
    """``--gpus-per-run 2``: the job starts torchrun with one rank per GPU (here 2 CPU ranks, gloo). Rank 0
    searches and reports; both refine. Refinement on 2 ranks is data parallel: the same global batches,
    BatchNorm statistics per rank, so its numbers are close to, not equal to, one process's."""
    from cpq_lib.experiment import read_record
    from cpq_lib.sweep import _run_group

    shutil.copytree(quick_baseline_dir, tmp_path / "shared" / "baseline")
    overrides = {"allocation.method": "uniform", "refine.epochs": 1}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert _run_group("quick", [(overrides, one)], str(tmp_path / "shared")) == [one + "/record.json"]
    assert _run_group("quick", [(overrides, two)], str(tmp_path / "shared"), ranks=2) == [two + "/record.json"]
    single, double = read_record(one + "/record.json"), read_record(two + "/record.json")
    assert single["results"]["refinement"]["ranks"] == 1 and double["results"]["refinement"]["ranks"] == 2
    assert double["results"]["plan"] == single["results"]["plan"]  # the search ran once, on rank 0, as in one process
    assert double["results"]["before_refinement"] == single["results"]["before_refinement"]
    history = double["results"]["refinement"]["history"]
    assert len(history) == 1 and abs(history[0]["val_accuracy"] - single["results"]["refinement"]["history"][0]["val_accuracy"]) < 0.05
    assert not list((tmp_path / "shared").glob("group-*.json"))  # the rank's group file is removed
    started = os.path.getmtime(two + "/record.json")
    _run_group("quick", [(overrides, two)], str(tmp_path / "shared"), ranks=2)  # finished: read, not run again
    assert os.path.getmtime(two + "/record.json") == started


def test_a_sweep_with_several_gpus_per_run_gives_its_jobs_one_rank_per_gpu(tmp_path, monkeypatch):
    import cpq_lib.sweep as sweep
    from cpq_lib.jobs import ExecutorSettings

    submitted = []
    monkeypatch.setattr(sweep, "run_calls", lambda calls, *args, **kwargs: submitted.append(calls) or [])
    axes = [parse_axis("allocation.method=uniform,classpath")]
    for gpus, ranks in ((2, 2), (1, 1), (None, 1)):
        run_sweep("quick", axes, tmp_path / f"g{gpus}", progress=False, executor=ExecutorSettings(kind="slurm", gpus_per_job=gpus))
        assert [call.args[-1] for call in submitted[-1]] == [ranks, ranks]  # RunGroup(..., ranks): torchrun when > 1
