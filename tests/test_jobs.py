"""Executors: settings validation, the local parallelism cap, failures named per run, and the sbatch
array script the Slurm executor submits on a GPU partition (stand-in Slurm commands on PATH; the
real engine is in test_jobs_slurm.py)."""

from __future__ import annotations

import os
import re
import stat
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from cpq_lib.errors import ConfigError
from cpq_lib.jobs import Call, ExecutorSettings, SweepError, raise_failures, run_calls, submit_slurm

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # job processes cannot import the test module


def stamp_interval(folder: str, name: str, seconds: float) -> str:
    started = time.time()
    time.sleep(seconds)
    Path(folder, f"{name}.txt").write_text(f"{started} {time.time()}")
    return name


def fail_with(message: str) -> None:
    raise RuntimeError(message)


def test_settings_are_validated():
    for kwargs, message in (({"kind": "ray"}, "'ray' is not known"), ({"parallel": 0}, "parallel must be >= 1"),
                            ({"gpus_per_job": -1}, "gpus_per_job"), ({"timeout_min": 0}, "timeout_min"),
                            ({"kind": "local", "partition": "gpu"}, "need executor 'slurm'")):
        with pytest.raises(ConfigError, match=message):
            ExecutorSettings(**kwargs)


@pytest.mark.parametrize("parallel", [1, 3])
def test_local_processes_respect_the_parallelism_cap(tmp_path, parallel):
    done = []
    calls = [Call(f"r{i}", stamp_interval, (str(tmp_path), f"r{i}", 2.0)) for i in range(3)]
    settings = ExecutorSettings(kind="local", parallel=parallel, local_gpus=0, poll_seconds=0.1)
    failures = run_calls(calls, settings, tmp_path / "jobs", on_done=lambda call: done.append(call.name), progress=False)
    assert failures == [] and sorted(done) == ["r0", "r1", "r2"]
    intervals = sorted(tuple(map(float, (tmp_path / f"r{i}.txt").read_text().split())) for i in range(3))
    overlapping = sum(a_end > b_start for (_, a_end), (b_start, _) in zip(intervals, intervals[1:]))
    if parallel == 1:
        assert overlapping == 0  # one at a time
    else:
        assert overlapping == 2  # all three at once (each sleeps 2 s; they start within a fraction of that)
    pids = {p.name.split("_")[0] for p in (tmp_path / "jobs").glob("*_result.pkl")}
    assert len(pids) == 3  # a process per run


def test_a_failed_job_is_named_with_its_log_and_the_others_finish(tmp_path):
    calls = [Call("good", stamp_interval, (str(tmp_path), "good", 0.0)),
             Call("bad", fail_with, ("the data root is missing",))]
    failures = run_calls(calls, ExecutorSettings(kind="local", parallel=2, local_gpus=0, poll_seconds=0.1),
                         tmp_path / "jobs", progress=False)
    assert (tmp_path / "good.txt").is_file()
    assert [f.name for f in failures] == ["bad"] and "the data root is missing" in failures[0].error
    assert failures[0].log and Path(failures[0].log).is_file()
    with pytest.raises(SweepError, match=r"1 of 2 run\(s\) failed:\n  bad: .*the data root is missing.*log: "):
        raise_failures(failures, 2)


def test_local_jobs_are_spread_over_the_gpus(tmp_path):
    from cpq_lib.jobs import local_executor

    settings = ExecutorSettings(kind="local", local_gpus=2)
    assert [local_executor(settings, tmp_path, i).parameters["visible_gpus"] for i in range(3)] == [(0,), (1,), (0,)]
    assert local_executor(ExecutorSettings(kind="local", local_gpus=0), tmp_path, 0).parameters["gpus_per_node"] == 0
    with pytest.raises(ConfigError, match="gpus_per_job=2 but this machine has 1"):
        local_executor(ExecutorSettings(kind="local", local_gpus=1, gpus_per_job=2), tmp_path, 0)


def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    tool = bin_dir / name
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)


def test_slurm_on_a_gpu_partition_asks_one_gpu_per_run_and_passes_site_options(tmp_path, monkeypatch):
    """What the CPU-only test cluster (tests/test_jobs_slurm.py) cannot show: GPU partitions, accounts and
    QOS, checked in the sbatch script submitted to stand-in Slurm commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "sbatch", 'echo "Submitted batch job 4242"')  # submitit keeps the script in the job folder
    monkeypatch.setenv("PATH", str(bin_dir))  # no srun, squeue, sinfo: not a cluster
    settings = ExecutorSettings(kind="slurm", partition="gpu-h100")
    with pytest.raises(ConfigError, match="needs Slurm's srun, squeue, sinfo on PATH"):
        submit_slurm([Call("r", stamp_interval, (str(tmp_path), "r", 0.0))], settings, tmp_path / "jobs")
    _stand_in(bin_dir, "srun", "exit 0")
    _stand_in(bin_dir, "squeue", "exit 0")
    _stand_in(bin_dir, "sinfo", "echo 'cpu*|10|32|128000|(null)'; echo 'gpu-h100|4|64|512000|gpu:h100:8(S:0-1)'")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    settings = ExecutorSettings(kind="slurm", parallel=4, partition="gpu-h100", account="lab", timeout_min=90,
                                cpus_per_task=8, mem_gb=32, setup=("source /opt/venv/bin/activate",),
                                slurm_args={"qos": "normal", "exclusive": True})
    calls = [Call(f"run{i}", stamp_interval, (str(tmp_path), f"run{i}", 0.0)) for i in range(6)]
    jobs = submit_slurm(calls, settings, tmp_path / "jobs")
    assert [call.name for call, _ in jobs] == [f"run{i}" for i in range(6)]
    assert [job.job_id for _, job in jobs] == [f"4242_{i}" for i in range(6)]
    (script_path,) = (tmp_path / "jobs").glob("*/*_submission.sh")  # one sbatch script for the whole array
    script = script_path.read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M))
    assert options["array"] == "0-5%4"  # six runs, at most four at once
    assert options["partition"] == "gpu-h100" and options["account"] == "lab" and options["qos"] == "normal"
    assert "exclusive" in options  # an sbatch option submitit does not know travels as it is
    assert options["gpus-per-node"] == "1" and options["ntasks-per-node"] == "1" and options["nodes"] == "1"
    assert options["time"] == "90" and options["cpus-per-task"] == "8" and options["mem"] == "32GB"
    assert options["job-name"] == "cpq-sweep"
    assert "source /opt/venv/bin/activate" in script

    two = ExecutorSettings(kind="slurm", partition="gpu-h100", gpus_per_job=2)
    submit_slurm([Call("r", stamp_interval, (str(tmp_path), "r", 0.0))], two, tmp_path / "jobs2")
    (script_path,) = (tmp_path / "jobs2").glob("*/*_submission.sh")
    assert "#SBATCH --gpus-per-node=2" in script_path.read_text()
    cpu = ExecutorSettings(kind="slurm")  # the default partition has no GPUs: none asked
    submit_slurm([Call("r", stamp_interval, (str(tmp_path), "r", 0.0))], cpu, tmp_path / "jobs3")
    (script_path,) = (tmp_path / "jobs3").glob("*/*_submission.sh")
    assert "gpus-per-node" not in script_path.read_text() and "#SBATCH --partition=cpu" in script_path.read_text()
    with pytest.raises(ConfigError, match=r"partition 'gpu-h100' cannot give 9 GPU\(s\) per run: it has 4 node\(s\), "
                                          r"at most 64 CPUs, 500 GiB and 8 GPU\(s\) per node \(gres: gpu:h100:8\(S:0-1\)\)"):
        submit_slurm(calls, ExecutorSettings(kind="slurm", partition="gpu-h100", gpus_per_job=9), tmp_path / "jobs4")
    assert not (tmp_path / "jobs4").exists()
