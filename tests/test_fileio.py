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
