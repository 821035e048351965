"""benchmarks/gpu_check.py (issue #13): the dry run exercises every section on CPU and writes its report.

The GPU path is the same code at full sizes (``make gpu-check``); here only the CPU dry run, the peak-FLOP/s
table and the time budget are tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_table_and_mfu(gpu_check):
    peak = gpu_check.peak_tflops
    assert peak("NVIDIA H200") == 989.0 and peak("NVIDIA GH200 480GB") == 989.0
    assert peak("NVIDIA H100 80GB HBM3") == 989.0 and peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0 and peak("NVIDIA L4") == 121.0
    assert peak("NVIDIA L40S") == 362.0 and peak("Tesla V100-SXM2-16GB") == 125.0 and peak("Tesla T4") == 65.0
    assert peak("Some Future Accelerator") is None and peak(None) is None
    assert gpu_check.mfu(989e12, 2.0, 989.0) == pytest.approx(0.5)
    assert gpu_check.mfu(1e12, 1.0, None) is None


def test_dry_run_runs_every_section_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, OMP_NUM_THREADS="1", CMBFE_THREADS="1")
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--peak-tflops", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((out / "check.json").read_text())
    for key in ("dry_run", "device", "peak", "settings", "sections", "goals", "paper_estimate", "wall_s"):
        assert key in rep, key
    assert rep["dry_run"] is True and rep["device"]["type"] == "cpu" and rep["device"]["torch"]
    assert rep["peak"] == {"tflops": 1.0, "source": "--peak-tflops", "note": None}
    sec = rep["sections"]
    assert list(sec) == ["train_steps", "fe_ratio", "predict", "ddp"]
    for name, entry in sec.items():
        assert entry["ok"] and entry["error"] is None, (name, entry.get("error"), entry.get("traceback"))
    rows = sec["train_steps"]["results"]["rows"]
    assert len(rows) == 2 * 2 * 2  # SSD-512/300 x 2 batches x float16 path / bfloat16
    for r in rows:
        assert r["median_s"] > 0 and r["images_per_s"] > 0 and r["flops_per_step"] > 0 and 0 < r["mfu"] < 1
    # forward + backward FLOPs scale with the batch
    by = {(r["size"], r["batch"], r["amp_dtype"]): r["flops_per_step"] for r in rows}
    assert by[(160, 4, "bfloat16")] == pytest.approx(2 * by[(160, 2, "bfloat16")], rel=0.02)
    fe = sec["fe_ratio"]["results"]["rows"]
    assert [r["backbone"] for r in fe] == ["vgg16", "mobilenet_v3", "resnet34"]
    assert all(0.5 < r["ratio"] < 2.0 and r["paper_ratio"] > 1 for r in fe)
    pr = sec["predict"]["results"]
    assert pr["predict_slices_per_s"] > 0 and pr["slices"] == 8 and pr["model_only_slices_per_s_float32"] > 0
    ddp = sec["ddp"]["results"]
    la = ddp["launch"]
    assert la["returncode"] == 0 and la["ok"] and la["backend"] == "gloo" and la["nproc_per_node"] == 2
    assert la["timings"]["world_size"] == 2 and la["ddp_in_fit"] and len(la["log"]) == 3
    assert ddp["probe"]["ok"] and ddp["probe"]["backend"] == "gloo" and len(ddp["probe"]["losses"]) == 2
    assert rep["goals"]["ssd512_vgg16_amp_mfu"]["met"] is None  # a dry run says nothing about the goals
    assert rep["goals"]["fe_ratio_vgg16"]["value"] == fe[0]["ratio"]
    est = rep["paper_estimate"]
    assert est["s_per_iteration_ssd512"] > 0 and est["total_hours"] > 0 and "dry run" in est["note"]
    md = (out / "check.md").read_text()
    for heading in ("# GPU check (DRY RUN", "## train_steps", "## fe_ratio", "## predict", "## ddp", "## Goals"):
        assert heading in md, heading
    assert sorted(f.name for f in out.iterdir()) == ["check.json", "check.md"]
    assert rep["wall_s"] < 120


def test_spent_budget_records_skipped_sections(gpu_check, tmp_path, capsys):
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "0", "--sections", "predict,ddp"])
    assert rc == 1
    rep = json.loads((tmp_path / "check.json").read_text())
    assert list(rep["sections"]) == ["predict", "ddp"]
    assert all(not e["ok"] and "budget" in e["error"] for e in rep["sections"].values())
    assert (tmp_path / "check.md").is_file() and "SOME SECTIONS FAILED" in capsys.readouterr().out
