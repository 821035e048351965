"""cmbfe.utils: atomic writes."""

from __future__ import annotations

import os

import pytest

from cmbfe.utils import atomic_write_bytes, atomic_write_json


def test_atomic_write_gives_open_permissions_and_replaces(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"v": 1})
    atomic_write_json(p, {"v": 2})
    assert p.read_text().replace(" ", "").replace("\n", "") == '{"v":2}'
    ref = tmp_path / "ref"
    ref.write_text("")  # what a plain open() gives under this umask
    assert p.stat().st_mode & 0o777 == ref.stat().st_mode & 0o777
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]  # no temp file left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_bytes(p, b"old")
    with pytest.raises(ValueError):
        atomic_write_json(p, {"v": float("nan")})  # not valid JSON: refused before anything is written
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.json"]
