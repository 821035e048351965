"""benchmarks/thread_invariance.py (issue #17): the smoke dry run trains the seed-0 configuration with 1 and
with 2 threads, evaluates each as Table 2 does and writes the CSV; a second call reuses the finished runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
from test_data import make_pre

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "thread_invariance.py"


@pytest.fixture(scope="module")
def ti():
    spec = importlib.util.spec_from_file_location("thread_invariance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_writes_one_row_per_thread_count_and_reuses_runs(ti, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CMBFE_THREADS", "1")
    pre = make_pre(tmp_path)
    out = tmp_path / "runs"
    args = ["--dry-run", "--data", str(pre), "--out", str(out), "--set", "train.lr=0.002"]
    assert ti.main(args) == 0
    df = pd.read_csv(out / "thread_invariance.csv")
    assert list(df.columns) == ti.COLUMNS and df["threads"].tolist() == [1, 2]
    assert df["test AP"].between(0, 1).all() and df["val AP"].between(0, 1).all()
    assert (df["iterations"] == 4).all() and (df["train s"] > 0).all()
    runs = [Path(r) for r in df["run"]]
    assert [r.name for r in runs] == ["threads1", "threads2"] and all((r / "model.pt").is_file() for r in runs)
    cfg = (runs[0] / "config.yaml").read_text()
    assert "lr: 0.002" in cfg and "seed: 0" in cfg  # --set passed through, the seed-0 configuration
    assert "spread over threads [1, 2]: test AP" in capsys.readouterr().out
    stamp = [(r / "model.pt").stat().st_mtime_ns for r in runs]
    assert ti.main(args) == 0  # resumable: the finished runs are reused, not retrained
    assert [(r / "model.pt").stat().st_mtime_ns for r in runs] == stamp
    assert "reusing" in capsys.readouterr().out
    # another --set is another configuration: its own folder
    assert ti.run_dir(out, ti.C.load("smoke", ["train.lr=0.001"]), pre, 1).parent != runs[0].parent
