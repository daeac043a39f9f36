"""eagle3.io: a failed write leaves the old file (or folder) whole and no temp behind; modes and
hashes are what they say."""

from __future__ import annotations

import hashlib
import stat

import pytest

from eagle3.io import atomic_dir, atomic_path, sha256_file, write_atomic, write_json_atomic

pytestmark = pytest.mark.unit


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    f = tmp_path / "a.json"
    write_json_atomic(f, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(f) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert f.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_modes_public_and_private(tmp_path):
    assert stat.S_IMODE(write_atomic(tmp_path / "pub", "x").stat().st_mode) == 0o644
    secret = write_atomic(tmp_path / "env", b"KEY=1\n", mode=0o600)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_bytes() == b"KEY=1\n"


def test_atomic_dir_swaps_whole_folders(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(d) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed")
    assert (d / "a").read_text() == "1"
    with atomic_dir(d) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["b"]  # the new folder, not a merge
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_sha256_file_equals_hashlib_on_the_whole_bytes(tmp_path):
    data = bytes(range(256)) * 9000  # > one 1 MiB block
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()


def test_json_hashes_are_pinned_and_key_order_free():
    # Both forms key files already written (data manifests' digests, shard keys; journals, flow
    # caches): a change would orphan them, so their values are pinned here.
    from eagle3.io import sha256_json

    o = {"b": [1, 2.5], "a": {"x": "é"}}
    assert sha256_json(o) == "00398da8cb31622bdb799094800f9d2f3a9233f15aac40e16890cac7c6d2dcc7"
    compact = "9f06e087906196d72ba66fb9be19db5e447a16c8cede1d2d00cd0481da0ddeb8"
    assert sha256_json(o, compact=True) == compact
    assert sha256_json({"a": {"x": "é"}, "b": [1, 2.5]}, compact=True) == compact
