"""Safe, once-only zip extraction.

Python's ``zipfile.extractall`` sanitises names silently; we want to *refuse* an archive that tries
to escape its folder (a clear error beats a quietly rewritten path) and to know that an earlier
extraction finished, so we check each member ourselves and mark completion with a manifest.

Several processes may load the same archive into an empty cache at once (a sweep starting its runs):
extraction holds a lock file per archive, so one process extracts while the others wait and then
reuse the copy. A killed extraction leaves a staging folder; the next extraction of that archive
(holding the lock, so no one else is writing it) removes it. Archives that expand beyond a size
limit or a compression ratio (zip bombs) are refused before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from filelock import FileLock

from ..errors import DataError, UnsafeArchiveError
from ..fileio import sha256_file

MANIFEST = ".cpq-extracted.json"
MAX_BYTES_ENV = "CPQ_MAX_EXTRACT_BYTES"
DEFAULT_MAX_BYTES = 16 * 2**30   # 16 GiB expanded, at most
MAX_RATIO = 200                  # expanded size / archive size; image archives are near 1


def _checked_member_path(name: str) -> PurePosixPath:
    """Reject absolute paths, drive letters and ``..`` components of an archive member name."""
    normalised = name.replace("\\", "/")
    member = PurePosixPath(normalised)
    if member.is_absolute() or (len(normalised) > 1 and normalised[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path; only relative paths are allowed")
    if ".." in member.parts:
        raise UnsafeArchiveError(f"archive member {name!r} contains '..'; it would land outside the target folder")
    return member


def max_extract_bytes() -> int:
    value = os.environ.get(MAX_BYTES_ENV)
    if value is None:
        return DEFAULT_MAX_BYTES
    try:
        limit = int(value)
    except ValueError:
        raise DataError(f"{MAX_BYTES_ENV}={value!r} is not an integer number of bytes") from None
    if limit < 1:
        raise DataError(f"{MAX_BYTES_ENV}={value!r} must be a positive number of bytes")
    return limit


def check_zip_members(archive: zipfile.ZipFile, archive_bytes: int | None = None) -> list[zipfile.ZipInfo]:
    """Return the file members after checking names, file/folder clashes and the expanded size."""
    files, folders = [], set()
    for info in archive.infolist():
        member = _checked_member_path(info.filename)
        folders.update(str(parent) for parent in member.parents if str(parent) != ".")
        if info.is_dir():
            folders.add(str(member))
        else:
            files.append((info, str(member)))
    clashes = sorted(path for _, path in files if path in folders)
    if clashes:
        raise DataError(f"archive member {clashes[0]!r} is both a file and a folder in the archive; the archive is malformed")
    expanded = sum(info.file_size for info, _ in files)
    limit = max_extract_bytes()
    if expanded > limit:
        raise DataError(f"archive expands to {expanded:,} bytes, above the limit of {limit:,} bytes "
                        f"(raise it with {MAX_BYTES_ENV}=<bytes> if the archive is trusted)")
    if archive_bytes and expanded > MAX_RATIO * max(archive_bytes, 1) and expanded > 2**20:
        raise DataError(f"archive expands {expanded / archive_bytes:.0f}-fold ({archive_bytes:,} -> {expanded:,} bytes); "
                        f"more than {MAX_RATIO}-fold looks like a zip bomb, not a data set")
    return [info for info, _ in files]


def remove_stale_staging(target: Path) -> None:
    """Remove staging folders that killed extractions of ``target`` left (call with the lock held)."""
    for leftover in target.parent.glob(f".{target.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def extract_zip_once(zip_path: str | os.PathLike, cache_root: Path) -> Path:
    """Extract ``zip_path`` under ``cache_root/extracted/<sha256 prefix>`` unless a complete copy is there.

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
        members = check_zip_members(archive, zip_path.stat().st_size)  # refuse before writing anything
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.parent / f"{target.name}.lock")):
            if not _is_complete(target, digest):  # else another process finished it while we waited
                remove_stale_staging(target)
                _extract(archive, members, zip_path.name, target, digest)
    if not _is_complete(target, digest):
        raise DataError(f"extraction of {zip_path} into {target} is incomplete")
    return target


def _extract(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], source: str, target: Path, digest: str) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        root = staging.resolve()
        for info in members:
            destination = (staging / _checked_member_path(info.filename)).resolve()
            if root not in destination.parents:
                raise UnsafeArchiveError(f"archive member {info.filename!r} resolves outside {target}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as member, open(destination, "wb") as sink:
                shutil.copyfileobj(member, sink)
        (staging / MANIFEST).write_text(json.dumps({"sha256": digest, "files": len(members), "source": source}), encoding="utf-8")
        if target.exists():  # an incomplete copy (we hold the lock: nobody reads it)
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


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
