"""The package lock: every distribution the set-up installs, pinned, and how an environment compares to it.

``requirements.lock`` is made by ``scripts/lock.sh`` (uv's ``pip compile``, universal, one version per
package) from ``pyproject.toml`` and the hand-kept pins in ``constraints.txt``; ``scripts/setup.sh``
installs with it as pip constraints. Its header carries a digest of those inputs, so a test notices
a dependency change that was not locked again. Results record the installed versions and whether
they match the lock: numbers made with other packages are not the stored notebooks' numbers.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
PYPROJECT = REPO / "pyproject.toml"
DOCS_PINS = REPO / "docs" / "requirements.txt"  # the documentation site's tools, pinned apart from the lock
CONSTRAINTS = REPO / "constraints.txt"
def canonicalize_name(name: str) -> str:
    """PEP 503 normalised name (what packaging.utils does; kept here so scripts/lock.sh needs only the
    standard library to compute the inputs digest)."""
    return re.sub(r"[-_.]+", "-", name).lower()


INPUTS_LINE = re.compile(r"^# inputs sha256: ([0-9a-f]{64})$", re.M)
PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*(?:;\s*(.+))?$")
NOT_LOCKED = {"cpq", "pip"}  # the project itself (editable), and the installer that reads the lock


@dataclass(frozen=True)
class Pin:
    name: str  # canonical (lower case, dashes)
    version: str
    marker: str | None = None

    def applies(self) -> bool:
        """Whether this environment (Python version, platform) installs it."""
        from packaging.markers import Marker

        return self.marker is None or Marker(self.marker).evaluate()


def read_lock(path: str | Path = LOCK) -> list[Pin]:
    """The ``name==version ; marker`` lines of a lock file (comments and ``via`` notes skipped)."""
    pins = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = PIN_LINE.match(stripped)
        if match is None:
            raise ValueError(f"{path}:{number}: not an exact pin 'name==version [; marker]': {stripped!r}")
        pins.append(Pin(canonicalize_name(match[1]), match[2], match[3]))
    return pins


def inputs_digest(pyproject: str | Path = PYPROJECT, constraints: str | Path = CONSTRAINTS) -> str:
    """sha256 of what the lock is made from: the project's Python range and dependency lists, and the pins
    of ``constraints.txt`` (comments and blank lines ignored, so editing prose does not stale the lock)."""
    project = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))["project"]
    pins = [line.split("#", 1)[0].strip() for line in Path(constraints).read_text(encoding="utf-8").splitlines()]
    source = {"requires-python": project.get("requires-python"), "dependencies": project.get("dependencies", []),
              "optional-dependencies": project.get("optional-dependencies", {}), "constraints": [p for p in pins if p]}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def recorded_inputs_digest(path: str | Path = LOCK) -> str | None:
    match = INPUTS_LINE.search(Path(path).read_text(encoding="utf-8"))
    return match[1] if match else None


def installed_versions() -> dict[str, str]:
    """Every distribution installed in this environment, by canonical name.

    Copies that a package vendors (setuptools puts its ``_vendor`` folder on ``sys.path`` once imported)
    are not installed distributions and would shadow the real ones' versions: skipped.
    """
    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        location = Path(str(getattr(dist, "_path", "")))
        if name and not any(part in ("_vendor", "vendor", "_vendored") for part in location.parts):
            versions.setdefault(canonicalize_name(name), dist.version)
    return dict(sorted(versions.items()))


def docs_pins(path: str | Path = DOCS_PINS) -> dict[str, str]:
    """``name==version`` lines of the documentation tools' pin file (none where it is absent)."""
    if not Path(path).is_file():
        return {}
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def lock_differences(installed: dict[str, str] | None = None, path: str | Path = LOCK,
                     extra: str | Path = DOCS_PINS) -> dict[str, tuple[str | None, str | None]]:
    """``{name: (installed, locked)}`` for every installed package whose version is not the locked one
    (locked None: installed but not in the lock). Locked packages that are not installed are not
    differences: a universal lock also names what only other platforms or Pythons install. The site
    tools of ``extra`` (scripts/docs.sh installs them) count as locked at their pins."""
    installed = installed_versions() if installed is None else installed
    locked = {**docs_pins(extra), **{pin.name: pin.version for pin in read_lock(path) if pin.applies()}}
    names = set(installed) - NOT_LOCKED
    return {name: (installed.get(name), locked.get(name)) for name in sorted(names)
            if installed.get(name) != locked.get(name)}


def lock_status(installed: dict[str, str] | None = None, path: str | Path = LOCK) -> str:
    """One phrase for records and notebook headers: does this environment hold exactly the locked versions?"""
    if not Path(path).is_file():
        return "no lock file (installed from a wheel?)"
    differences = lock_differences(installed, path)
    if not differences:
        return "matches requirements.lock"
    shown = ", ".join(f"{name} {have or '-'} (lock {want or '-'})" for name, (have, want) in list(differences.items())[:3])
    more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
    return f"differs from requirements.lock: {shown}{more}"
