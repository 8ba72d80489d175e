"""calib.io: atomic writes (nothing half-written, nothing lost), hashes, manifests."""

from __future__ import annotations

import hashlib

import pytest

from calib import io
from calib.errors import CalibError


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "sub" / "a.txt"  # the folder is created
    io.atomic_write_text(out, "first")
    io.atomic_write_text(out, "second")
    assert out.read_text() == "second"
    assert [p.name for p in out.parent.iterdir()] == ["a.txt"]
    assert out in io.WRITTEN and not io.PENDING_TEMPS


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError), io.atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert not io.PENDING_TEMPS


def test_a_directory_or_an_unwritable_place_is_a_user_error(tmp_path):
    with pytest.raises(CalibError, match="is a directory"):
        io.atomic_write_text(tmp_path, "x")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CalibError, match="cannot create the folder") as err:
        io.atomic_write_text(blocker / "inside.txt", "x")
    assert str(blocker) in str(err.value)


def test_records_exclude_caches_from_written(tmp_path):
    out = tmp_path / "cache.bin"
    with io.atomic_path(out, record=False) as tmp:
        tmp.write_bytes(b"c")
    assert out.read_bytes() == b"c" and out not in io.WRITTEN


def test_hashes_are_sha256_of_the_content(tmp_path):
    p = tmp_path / "f"
    data = b"x" * (3 * 1024 + 7)
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert io.file_sha256(p, chunk=1024) == want  # chunked reading changes nothing
    assert io.text_sha256(data) == want == io.text_sha256(data.decode())


def test_manifest_round_trips_through_a_netcdf_attribute():
    m = io.manifest(kind="posterior", seed=3, data_hash="abc", command=["fit.py", "--x"])
    for key in ("kind", "calib_version", "created_utc", "libraries", "git_sha"):
        assert key in m
    assert m["command"] == "fit.py --x" and m["seed"] == 3
    text = io.manifest_to_attr(m)
    assert isinstance(text, str) and io.manifest_from_attr(text) == m
