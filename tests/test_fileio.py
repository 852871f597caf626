"""pqv_lightning.fileio: atomic writes and content hashes."""

import hashlib

import pytest

from pqv_lightning.fileio import atomic_write_text, file_digest, staged


def test_staged_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with staged(target) as tmp:
            (tmp_path / tmp).write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with staged(tmp_path / "fig.png", suffix=".png") as tmp:
        assert tmp.endswith(".png")


def test_file_digest_is_the_content_sha256(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    assert file_digest(a) == file_digest(b) == hashlib.sha256(b"weights").hexdigest()[:16]
    assert len(file_digest(a, 64)) == 64
