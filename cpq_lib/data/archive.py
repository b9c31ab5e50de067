"""Safe, once-only zip extraction.

Python's ``zipfile.extractall`` sanitises names silently; we want to *refuse* an archive that tries
to escape its folder (a clear error beats a quietly rewritten path) and to know that an earlier
extraction finished, so we check each member ourselves and mark completion with a manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import DataError, UnsafeArchiveError
from ..fileio import sha256_file

MANIFEST = ".cpq-extracted.json"


def _checked_member_path(name: str) -> PurePosixPath:
    """Reject absolute paths, drive letters and ``..`` components of an archive member name."""
    normalised = name.replace("\\", "/")
    member = PurePosixPath(normalised)
    if member.is_absolute() or (len(normalised) > 1 and normalised[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path; only relative paths are allowed")
    if ".." in member.parts:
        raise UnsafeArchiveError(f"archive member {name!r} contains '..'; it would land outside the target folder")
    return member


def check_zip_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Return the file members after checking every name is safe to extract."""
    files = []
    for info in archive.infolist():
        _checked_member_path(info.filename)
        if not info.is_dir():
            files.append(info)
    return files


def extract_zip_once(zip_path: str | os.PathLike, cache_root: Path) -> Path:
    """Extract ``zip_path`` under ``cache_root/<sha256 prefix>`` unless a complete copy is there.

    Extraction goes to a temporary sibling folder that is renamed into place only when every member
    is written, so a killed extraction never looks complete. Returns the extraction folder.
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise DataError(f"zip archive not found: {zip_path}")
    digest = sha256_file(zip_path)
    target = cache_root / "extracted" / digest[:16]
    if _is_complete(target, digest):
        return target
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{zip_path} is not a readable zip archive: {exc}") from exc
    with archive:
        members = check_zip_members(archive)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            root = staging.resolve()
            for info in members:
                destination = (staging / _checked_member_path(info.filename)).resolve()
                if root not in destination.parents:
                    raise UnsafeArchiveError(f"archive member {info.filename!r} resolves outside {target}")
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink)
            manifest = {"sha256": digest, "files": len(members), "source": zip_path.name}
            (staging / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    if not _is_complete(target, digest):
        raise DataError(f"extraction of {zip_path} into {target} is incomplete")
    return target


def _is_complete(target: Path, digest: str) -> bool:
    manifest_path = target / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("sha256") != digest:
        return False
    count = sum(1 for path in target.rglob("*") if path.is_file() and path.name != MANIFEST)
    return count == manifest.get("files")
