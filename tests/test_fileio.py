import pytest

from cpq_lib.fileio import atomic_path, atomic_write_json, sha256_file


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("killed")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_json_and_hash(tmp_path):
    atomic_write_json({"a": 1}, tmp_path / "sub" / "x.json")
    assert (tmp_path / "sub" / "x.json").read_text(encoding="utf-8") == '{\n  "a": 1\n}\n'
    (tmp_path / "abc").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from cpq_lib.fileio import HOST

    target = tmp_path / "state.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / f".state.pt.{HOST}.{dead_pid}.abc123.tmp"
    live = tmp_path / f".state.pt.{HOST}.{os.getpid()}.def456.tmp"  # a writer still running (this process)
    other_host = tmp_path / f".state.pt.elsewhere.{dead_pid}.ghi789.tmp"  # cannot tell: kept
    for path in (stale, live, other_host):
        path.write_bytes(b"x" * 1000)
    atomic_write_json({"epoch": 3}, target)
    assert not stale.exists() and live.exists() and other_host.exists()
    assert target.is_file()
