"""scripts/parallel_grid.sh: one sweep process per (point, allocator, seed), each with its own folder and log."""

import os
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "parallel_grid.sh"


def _fake_python(tmp_path: Path) -> Path:
    """A stand-in interpreter that records its arguments, one file per call, instead of sweeping."""
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys, uuid\n"
                    f"open(os.path.join({str(tmp_path / 'calls')!r}, uuid.uuid4().hex), 'w').write(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    (tmp_path / "calls").mkdir()
    return fake


def _calls(tmp_path: Path) -> list[list[str]]:
    import json
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "calls").iterdir())]


def _value(args: list[str], flag: str, prefix: str) -> str:
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag and args[i + 1].startswith(prefix)]
    assert len(values) == 1, (flag, prefix, args)
    return values[0]


def test_one_process_per_point_allocator_and_seed(tmp_path):
    env = {**os.environ, "PYTHON": str(_fake_python(tmp_path)), "POINTS": "2 4", "METHODS": "uniform classpath",
           "SEEDS": "0 1"}
    subprocess.run(["bash", str(SCRIPT), "data.zip", str(tmp_path / "out"), "7", "--set", "x=1"], env=env, check=True)
    calls = _calls(tmp_path)
    assert len(calls) == 8
    seen = set()
    for args in calls:
        assert args[:2] == ["-m", "cpq_lib.sweep"] and _value(args, "--data-root", "") == "data.zip"
        bits = _value(args, "--grid", "allocation.weight_bits,allocation.act_bits=").split("=")[1]
        method = _value(args, "--grid", "allocation.method=").split("=")[1]
        seed = _value(args, "--set", "seed=").split("=")[1]
        assert bits in ("2:2", "4:4") and _value(args, "--set", "refine.epochs=") == "refine.epochs=7"
        assert _value(args, "--out", "") == str(tmp_path / "out" / f"W{bits[0]}-{method}-s{seed}")
        assert args[-2:] == ["--set", "x=1"]  # extra arguments reach every sweep
        assert (tmp_path / "out" / f"W{bits[0]}-{method}-s{seed}.log").is_file()
        seen.add((bits, method, seed))
    assert len(seen) == 8


def test_defaults_cover_the_whole_grid_and_a_failed_run_fails_the_script(tmp_path):
    fake = _fake_python(tmp_path)
    env = {**os.environ, "PYTHON": str(fake)}
    subprocess.run(["bash", str(SCRIPT), "d", str(tmp_path / "out")], env=env, check=True)
    calls = _calls(tmp_path)
    assert len(calls) == 15 and {_value(a, "--set", "refine.epochs=") for a in calls} == {"refine.epochs=15"}
    env["PYTHON"] = "false"
    assert subprocess.run(["bash", str(SCRIPT), "d", str(tmp_path / "out2")], env=env).returncode == 1


def test_missing_arguments_are_a_usage_error():
    result = subprocess.run(["bash", str(SCRIPT), "only-data"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
