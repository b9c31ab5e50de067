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


def test_member_that_is_both_file_and_folder_is_a_clear_error(tmp_path):
    archive = _zip_with(tmp_path, ["data/train/a", "data/train/a/b.png"])
    with pytest.raises(DataError, match="'data/train/a' is both a file and a folder"):
        extract_zip_once(archive, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def _bomb(tmp_path, megabytes=8):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("data/train/a/zeros.png", b"\0" * (megabytes << 20))
    return archive


def test_zip_bombs_are_refused_before_writing(tmp_path, monkeypatch):
    archive = _bomb(tmp_path)  # 8 MiB of zeros deflate to about 8 KiB: about 1000-fold
    with pytest.raises(DataError, match="expands .*-fold.*zip bomb"):
        extract_zip_once(archive, tmp_path / "cache")
    monkeypatch.setenv("CPQ_MAX_EXTRACT_BYTES", "1000")
    tree = zip_folder(make_image_folder(tmp_path / "tree"), tmp_path / "tree.zip")
    with pytest.raises(DataError, match="above the limit of 1,000 bytes.*CPQ_MAX_EXTRACT_BYTES"):
        extract_zip_once(tree, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    monkeypatch.setenv("CPQ_MAX_EXTRACT_BYTES", "lots")
    with pytest.raises(DataError, match="CPQ_MAX_EXTRACT_BYTES='lots' is not an integer"):
        extract_zip_once(tree, tmp_path / "cache")


def test_a_killed_extractions_staging_folder_is_removed_next_time(tmp_path):
    archive = zip_folder(make_image_folder(tmp_path / "tree"), tmp_path / "tree.zip")
    cache = tmp_path / "cache"
    target = extract_zip_once(archive, cache)
    import shutil

    shutil.rmtree(target)
    leftover = target.parent / f".{target.name}.killed"  # what mkdtemp left when the process died
    (leftover / "train").mkdir(parents=True)
    (leftover / "train" / "big.bin").write_bytes(b"x" * 10_000)
    assert extract_zip_once(archive, cache) == target
    assert not leftover.exists() and (target / MANIFEST).is_file()


def _extract_in_process(args):
    archive, cache, barrier = args
    barrier.wait()  # start together
    target = extract_zip_once(archive, cache)
    # read every file right away: a competitor deleting the folder would make this fail
    return sorted(p.relative_to(target).as_posix() for p in target.rglob("*.png") if p.read_bytes())


def test_concurrent_extractions_into_an_empty_cache_agree(tmp_path):
    import multiprocessing

    archive = zip_folder(make_image_folder(tmp_path / "tree", per_class=(40, 10)), tmp_path / "tree.zip")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(4)
        with context.Pool(4) as pool:
            listings = pool.map(_extract_in_process, [(archive, tmp_path / "cache", barrier)] * 4)
    assert all(listing == listings[0] for listing in listings) and len(listings[0]) == 3 * 50
    staging = [p for p in (tmp_path / "cache" / "extracted").iterdir() if p.name.startswith(".")]
    assert not staging
