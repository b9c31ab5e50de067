import zipfile

import pytest

from cpq_lib.data.archive import MANIFEST, extract_zip_once
from cpq_lib.errors import DataError, UnsafeArchiveError

from helpers import make_image_folder, zip_folder


def _zip_with(tmp_path, names):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name in names:
            handle.writestr(zipfile.ZipInfo(name), b"payload")
    return archive


@pytest.mark.parametrize("name", ["../escape.txt", "data/../../escape.txt", "/abs/escape.txt", "C:/escape.txt",
                                  "..\\escape.txt"])
def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path, name):
    archive = _zip_with(tmp_path, ["data/train/a/ok.png", name])
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError, match="escape.txt"):
        extract_zip_once(archive, cache)
    assert not list(tmp_path.rglob("escape.txt"))
    assert not (cache / "extracted").exists() or not any((cache / "extracted").iterdir())


def test_extracts_once_and_reuses_complete_copy(tmp_path):
    archive = zip_folder(make_image_folder(tmp_path / "tree"), tmp_path / "tree.zip")
    first = extract_zip_once(archive, tmp_path / "cache")
    assert (first / MANIFEST).is_file() and len(list(first.rglob("*.png"))) == 3 * 8
    marker = first / "train" / "cat" / "0000.png"
    stamp = marker.stat().st_mtime_ns
    assert extract_zip_once(archive, tmp_path / "cache") == first
    assert marker.stat().st_mtime_ns == stamp  # not extracted again


def test_incomplete_extraction_is_redone(tmp_path):
    archive = zip_folder(make_image_folder(tmp_path / "tree"), tmp_path / "tree.zip")
    target = extract_zip_once(archive, tmp_path / "cache")
    (target / "train" / "cat" / "0000.png").unlink()  # as if a member went missing
    again = extract_zip_once(archive, tmp_path / "cache")
    assert (again / "train" / "cat" / "0000.png").is_file()


def test_not_a_zip(tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="not a readable zip"):
        extract_zip_once(fake, tmp_path / "cache")
    with pytest.raises(DataError, match="not found"):
        extract_zip_once(tmp_path / "missing.zip", tmp_path / "cache")
