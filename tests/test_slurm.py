"""cpq_lib.slurm without a cluster: sinfo and squeue output parsed, requests resolved against
partitions (defaults and refusals), the ledger of submitted jobs, the watcher that reads squeue when
accounting does not answer. The same code against a real Slurm: test_jobs_slurm.py."""

from __future__ import annotations

import logging
import subprocess

import pytest

from cpq_lib import slurm
from cpq_lib.errors import ConfigError
from cpq_lib.slurm import (ENDED, LEDGER, Partition, QueueWatcher, gres_gpus, parse_sinfo, parse_squeue, queue_states,
                           read_ledger, resolve_request, still_queued, write_ledger)

SINFO = """cpu*|10|32|128000|(null)
cpu*|2|64|256000|(null)
gpu|4|64|512000|gpu:a100:4(S:0-1)
gpu|2|48|384000|gpu:a100:2,gpu:v100:2
big|1|128|1024000|gpu:h100:8
"""


def answers(stdout: str = "", returncode: int = 0, stderr: str = ""):
    calls = []

    def runner(command, **_):
        calls.append(command)
        return subprocess.CompletedProcess(command, returncode, stdout, stderr)

    runner.calls = calls
    return runner


@pytest.mark.parametrize("gres, gpus", [("(null)", 0), ("", 0), ("gpu:4", 4), ("gpu:a100:4(S:0-1)", 4),
                                        ("gpu:a100:2,gpu:v100:2", 4), ("gpu:a100:2(S:0),shard:8", 2),
                                        ("mps:100", 0), ("gpu", 0)])
def test_gpus_are_counted_from_sinfo_gres(gres, gpus):
    assert gres_gpus(gres) == gpus


def test_sinfo_lines_merge_into_one_partition_with_its_largest_node():
    parts = {p.name: p for p in parse_sinfo(SINFO)}
    assert list(parts) == ["cpu", "gpu", "big"]
    assert parts["cpu"] == Partition("cpu", 12, 64, 256000, 0, "", default=True)
    assert parts["gpu"].nodes == 6 and parts["gpu"].cpus == 64 and parts["gpu"].gpus == 4
    assert parts["gpu"].gres == "gpu:a100:4(S:0-1)" and not parts["gpu"].default
    assert parts["big"].gpus == 8 and parts["big"].memory_mb == 1024000


def test_requests_default_to_a_gpu_only_where_the_partition_has_gpus():
    parts = parse_sinfo(SINFO)
    cpu = resolve_request(None, None, None, None, parts)  # the default partition
    assert cpu.partition.name == "cpu" and cpu.gpus == 0
    gpu = resolve_request("gpu", None, 16, 64, parts)
    assert (gpu.partition.name, gpu.gpus, gpu.cpus, gpu.mem_gb) == ("gpu", 1, 16, 64)
    assert resolve_request("gpu", 0, None, None, parts).gpus == 0  # CPUs of a GPU partition, when asked
    assert resolve_request("big", 8, 128, 1000, parts).gpus == 8


def test_a_request_that_cannot_be_met_names_the_partition_and_what_it_has():
    parts = parse_sinfo(SINFO)
    with pytest.raises(ConfigError, match=r"partition 'cpu' cannot give 1 GPU\(s\) per run \(partitions with that many: "
                                          r"\['gpu', 'big'\]\); --gpus-per-run 0 runs on its CPUs: it has 12 node\(s\), "
                                          r"at most 64 CPUs, 250 GiB and 0 GPU\(s\) per node \(gres: none\)"):
        resolve_request("cpu", 1, None, None, parts)
    with pytest.raises(ConfigError, match=r"'gpu' cannot give 6 GPU\(s\) per run \(partitions with that many: \['big'\]\)"
                                          r" and 65 CPUs per run and 600 GB per run: it has 6 node"):
        resolve_request("gpu", 6, 65, 600, parts)
    with pytest.raises(ConfigError, match=r"partition 'gpus' does not exist on this cluster; choose one of "
                                          r"\['cpu', 'gpu', 'big'\]"):
        resolve_request("gpus", None, None, None, parts)
    with pytest.raises(ConfigError, match=r"no default partition; pass --partition, one of \['gpu', 'big'\]"):
        resolve_request(None, None, None, None, [p for p in parts if p.name != "cpu"])


def test_partitions_say_why_when_sinfo_fails():
    with pytest.raises(ConfigError, match="sinfo failed, so the cluster's partitions are unknown: slurm_load_partitions"):
        slurm.partitions(answers(returncode=1, stderr="slurm_load_partitions: Unable to contact slurm controller"))
    runner = answers(SINFO)
    assert [p.name for p in slurm.partitions(runner)] == ["cpu", "gpu", "big"]
    assert runner.calls == [["sinfo", "-h", "-o", "%P|%D|%c|%m|%G"]]


def test_squeue_lines_expand_pending_array_ranges():
    out = "12_0|RUNNING\n12_[1-3%2]|PENDING\n13|COMPLETED\n14_[5,7]|PENDING\nnoise\n"
    assert parse_squeue(out) == {"12_0": "RUNNING", "12_1": "PENDING", "12_2": "PENDING", "12_3": "PENDING",
                                 "13": "COMPLETED", "14_5": "PENDING", "14_7": "PENDING"}


def test_a_job_squeue_no_longer_lists_has_ended_and_a_failing_squeue_is_an_error():
    runner = answers("12_0|RUNNING\n12_1|TIMEOUT\n")
    assert queue_states(["12_0", "12_1", "12_2", "9"], runner) == {"12_0": "RUNNING", "12_1": "TIMEOUT",
                                                                   "12_2": ENDED, "9": ENDED}
    assert runner.calls == [["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", "12,9"]]
    assert queue_states(["9"], answers(returncode=1, stderr="slurm_load_jobs error: Invalid job id specified")) == \
        {"9": ENDED}  # squeue refuses ids it has forgotten
    with pytest.raises(ConfigError, match="squeue failed: Unable to contact slurm controller"):
        queue_states(["9"], answers(returncode=1, stderr="Unable to contact slurm controller"))
    assert queue_states([], answers()) == {}


def test_the_ledger_merges_entries_and_survives_damage(tmp_path, caplog):
    assert read_ledger(tmp_path) == {}
    write_ledger(tmp_path / "jobs", {"a": "12_0", "b": "12_1"})
    write_ledger(tmp_path / "jobs", {"b": "15_0", "c": "15_1"})
    assert read_ledger(tmp_path / "jobs") == {"a": "12_0", "b": "15_0", "c": "15_1"}
    (tmp_path / "jobs" / LEDGER).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert read_ledger(tmp_path / "jobs") == {}
    assert "damaged" in caplog.text


def test_only_pending_or_running_jobs_of_the_asked_runs_are_waited_for(tmp_path):
    write_ledger(tmp_path, {"a": "12_0", "b": "12_1", "c": "12_2", "d": "12_3", "other": "12_4"})
    runner = answers("12_0|RUNNING\n12_1|PENDING\n12_2|FAILED\n12_4|RUNNING\n")
    assert still_queued(["a", "b", "c", "d"], tmp_path, runner) == {"a": "12_0", "b": "12_1"}
    assert still_queued(["x"], tmp_path, answers()) == {}


def test_without_accounting_the_watcher_says_so_once_and_reads_squeue(monkeypatch, caplog):
    asked = []
    monkeypatch.setattr(slurm, "accounting_available", lambda: (asked.append(1), (False, "Slurm accounting storage is disabled"))[1])
    states = iter([{"12_0": "RUNNING", "12_1": "PENDING"}, {"12_0": "COMPLETED", "12_1": "RUNNING"},
                   {"12_1": ENDED}])
    monkeypatch.setattr(slurm, "queue_states", lambda jobs: next(states))
    watcher = QueueWatcher(delay_s=0)
    watcher.register_job("12_0")
    watcher.register_job("12_1")
    with caplog.at_level(logging.WARNING):
        watcher.update()
        assert watcher.get_state("12_0", mode="cache") == "RUNNING" and not watcher.is_done("12_0", mode="cache")
        watcher.update()
        assert watcher.is_done("12_0", mode="cache") and not watcher.is_done("12_1", mode="cache")
        watcher.update()
        assert watcher.is_done("12_1", mode="cache")  # no longer listed: ended
    assert len(asked) == 1
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "accounting does not answer" in said[0] and "storage is disabled" in said[0]
