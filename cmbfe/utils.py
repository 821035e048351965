"""Small shared helpers: atomic writes, seeding, CSV logging."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's own 0600 would hide results from others


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace`` (the file gets the
    permissions a plain ``open`` would give under the current umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    """Atomic JSON write."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path next to ``path`` (file or folder); on success rename it over ``path``.

    On an exception the temp is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        raise


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA); ask torch for deterministic algorithms on CPU."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _drop_rows_after(path: Path, iteration: int) -> None:
    """Rewrite CSV ``path`` (atomically) without the rows whose ``iteration`` column exceeds ``iteration``."""
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    if not lines:
        return
    header = next(csv.reader([lines[0]]))
    if "iteration" not in header:
        return
    col = header.index("iteration")
    kept = [ln for ln in lines[1:] if not ln.strip() or int(float(next(csv.reader([ln]))[col])) <= iteration]
    if len(kept) < len(lines) - 1:
        atomic_write_text(path, "".join([lines[0], *kept]))


class CSVLogger:
    """Append rows (dicts with fixed keys) to a CSV file, flushing each row; safe to reopen on resume.

    ``keep_through`` (when appending): rows whose ``iteration`` exceeds it are dropped first (atomically), so
    a run killed after its last checkpoint and resumed from it logs those iterations once, not twice."""

    def __init__(self, path: Path, fieldnames: list[str], append: bool = False,
                 keep_through: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not (append and self.path.exists())
        if not new and keep_through is not None:
            _drop_rows_after(self.path, keep_through)
        self._f = open(self.path, "w" if new else "a", newline="")  # noqa: SIM115 (held while logging)
        self._w = csv.DictWriter(self._f, fieldnames=fieldnames, extrasaction="ignore")
        if new:
            self._w.writeheader()

    def log(self, row: dict[str, Any]) -> None:
        self._w.writerow(row)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def json_safe(x: Any) -> Any:
    """``x`` with NaN/inf -> None and numpy scalars -> Python (dicts, lists and tuples recursively)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
