"""requirements.lock: complete, exact, made from the current pyproject.toml and constraints.txt, and installed."""

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from cpq_lib.lock import (CONSTRAINTS, LOCK, PYPROJECT, Pin, inputs_digest, lock_differences, lock_status, read_lock,
                          recorded_inputs_digest)

RELOCK = "run scripts/lock.sh and commit requirements.lock"


def _requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    listed = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in listed]


def test_lock_is_made_from_the_current_inputs():
    assert recorded_inputs_digest() == inputs_digest(), f"pyproject.toml or constraints.txt changed since the lock: {RELOCK}"


def test_inputs_digest_follows_dependencies_not_prose(tmp_path):
    pyproject, constraints = tmp_path / "pyproject.toml", tmp_path / "constraints.txt"
    pyproject.write_text(PYPROJECT.read_text(encoding="utf-8"), encoding="utf-8")
    constraints.write_text(CONSTRAINTS.read_text(encoding="utf-8") + "\n# a comment\n", encoding="utf-8")
    assert inputs_digest(pyproject, constraints) == inputs_digest()
    pyproject.write_text(PYPROJECT.read_text(encoding="utf-8").replace('"tqdm>=4.65"', '"tqdm>=4.66"'), encoding="utf-8")
    assert inputs_digest(pyproject, constraints) != inputs_digest()


def test_every_line_is_an_exact_pin_with_one_version_per_package():
    pins = read_lock()
    names = [p.name for p in pins]
    assert len(pins) > 100 and len(names) == len(set(names))  # fewest forks: one version each


def test_every_requirement_is_locked_at_a_version_it_allows():
    locked = {p.name: p for p in read_lock()}
    for requirement in _requirements():
        name = requirement.name.lower().replace("_", "-")
        assert name in locked, f"{requirement} is not in requirements.lock: {RELOCK}"
        assert requirement.specifier.contains(locked[name].version, prereleases=True), (requirement, locked[name])


def test_hand_kept_pins_are_the_locked_versions():
    locked = {p.name: p.version for p in read_lock()}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            assert locked[name.lower()] == version, (line, locked.get(name.lower()))


def test_a_malformed_lock_line_is_named(tmp_path):
    bad = tmp_path / "requirements.lock"
    bad.write_text("torch==2.14.1\nnumpy>=2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"requirements.lock:2: not an exact pin.*'numpy>=2'"):
        read_lock(bad)


def test_differences_name_the_package_and_both_versions():
    installed = {p.name: p.version for p in read_lock() if p.applies()}
    assert lock_status(installed) == "matches requirements.lock"
    locked_numpy = installed["numpy"]
    installed["numpy"] = "1.0.0"
    installed["left-pad"] = "0.1"
    assert lock_differences(installed) == {"left-pad": ("0.1", None), "numpy": ("1.0.0", locked_numpy)}
    assert lock_status(installed) == f"differs from requirements.lock: left-pad 0.1 (lock -), numpy 1.0.0 (lock {locked_numpy})"


def test_markers_select_what_this_environment_installs():
    assert Pin("x", "1", None).applies()
    assert not Pin("x", "1", "sys_platform == 'nonexistent'").applies()


@pytest.mark.skipif(not (Path(sys.prefix) / ".cpq-setup").is_file(), reason="not the environment scripts/setup.sh made")
def test_the_set_up_environment_holds_exactly_the_locked_versions():
    assert lock_differences() == {}, lock_status()


def test_site_tools_count_as_locked_at_their_pins(tmp_path):
    from cpq_lib.lock import lock_differences

    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.0.0\n", encoding="utf-8")
    docs = tmp_path / "docs.txt"
    docs.write_text("# site tools\nmkdocs==1.6.1\nMarkdown==3.11.3\n", encoding="utf-8")
    assert lock_differences({"numpy": "2.0.0", "mkdocs": "1.6.1", "markdown": "3.11.3"}, lock, docs) == {}
    assert lock_differences({"numpy": "2.0.0", "mkdocs": "1.5.0"}, lock, docs) == {"mkdocs": ("1.5.0", "1.6.1")}
    assert lock_differences({"numpy": "2.0.0", "mkdocs": "1.6.1"}, lock, tmp_path / "absent.txt") == {"mkdocs": ("1.6.1", None)}
