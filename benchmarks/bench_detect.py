"""Wall time of ``cmbfe detect`` per stage for a synthetic 256^2 x 70 scan and a 512^2 x 192 one.

    .venv/bin/python benchmarks/bench_detect.py [--scans 256x70 512x192] [--model DIR] [--threads N]
        [--threshold T] [--repeats 1] [--out results/bench_detect.md]

Targets (issue 20): <= 60 s and <= 180 s end to end on 2 cores. The table is printed and written to ``--out``.

The scans are patients of ``cmbfe.synth`` (default profile physics, 240 mm FOV; 2 mm slices with the slab
widened to SLICES, or, for more than 63 slices, slices thinned so that all SLICES cover the head) written as DICOM series; ``cmbfe detect`` (``run_detect``) reads them, runs
N4, the detector on every head slice, the 3D merging, the second stage (when the model has one), and writes the mask, CSV, JSON and the PDF/HTML report.
Stages (``report.json``'s ``timings_s``): read (DICOM), n4 (head mask + N4 + 8 bit), inference, merge, write
(mask, CSV, JSON), report (PDF + HTML), plus model loading; ``end to end`` is the whole call.

The model is ``--model`` or the shipped ``models/``; without one, the default profile's architecture with
untrained weights at ``--threshold`` (default 0.9), which times inference exactly but not a realistic number
of detections for the merge and the report (printed). Threads: ``--threads`` sets torch's (default: all cores,
as a user's laptop would); N4 runs with the one ITK thread cmbfe uses everywhere (byte-identical slices).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from cmbfe import config, modelfolder
from cmbfe.detect.command import run_detect
from cmbfe.detect.detector import Detector, load_detector
from cmbfe.dicom_write import write_dicom_series
from cmbfe.synth import synthesize_patient

STAGES = ("load_model", "read", "n4", "inference", "merge", "stage2", "write", "report")
TARGET_S = {256: 60.0, 512: 180.0}


def detector(model: str | None, threshold: float | None) -> tuple[Detector, str]:
    if model or (modelfolder.DEFAULT_DIR / modelfolder.WEIGHTS).is_file():
        det = load_detector(model, threshold=threshold)
        if det.stage2 is not None:
            return det, f"{det.path} (second stage, operating point {det.operating_point})"
        return det, f"{det.path} (threshold {det.threshold:.3g}, {det.threshold_source})"
    from cmbfe.models import build_model

    cfg = config.load("default")
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.fe).eval()
    thr = 0.9 if threshold is None else threshold
    det = Detector(net, cfg, thr, "--threshold", pixel_spacing_mm=(240 / 256, 240 / 256), matrix=256)
    return det, f"untrained default-profile architecture (no models/), threshold {thr:g}"


def scan(root: Path, size: int, slices: int) -> Path:
    top = 76.0  # the default slab's top (MNI z, mm); 2-mm slices widened downwards, or thinner slices
    head_mm = 126.0  # the default slab (cerebellum to vertex): more slices than 63 get thinner ones
    synth = config.load("default").to_dict()["synth"]
    dz = min(2.0, head_mm / slices)
    cfg = config.from_dict({"synth": {**synth, "matrix": size, "workers": 1, "seed": 424242, "slice_mm": dz,
                                      "z_range_mm": [top - dz * slices, top]}}).synth
    t0 = time.perf_counter()
    vol = synthesize_patient(0, cfg)
    folder = root / f"scan{size}"
    write_dicom_series(vol, folder, uid_seed=f"bench-{size}")
    print(f"  synthesised {size}^2 x {vol.shape[0]} ({len(vol.lesions)} CMBs) in "
          f"{time.perf_counter() - t0:.1f} s")
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", nargs="+", default=["256x70", "512x192"], help="SIZExSLICES per scan")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "results" /
                    "bench_detect.md")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["CMBFE_THREADS"] = str(args.threads)
    print(f"cmbfe detect benchmark: torch {torch.__version__}, {args.threads} torch thread(s), "
          f"{os.cpu_count()} cores, N4 on 1 ITK thread")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for spec in args.scans:
            size, slices = (int(v) for v in spec.lower().split("x"))
            src = scan(root, size, slices)
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                det, what = detector(args.model, args.threshold)  # loading is part of a user's call
                load = time.perf_counter() - t0
                res = run_detect(src, root / f"out{size}-{rep}", model=det)
                wall = time.perf_counter() - t0
                r = json.loads((res["out"] / "report.json").read_text())
                t = r["timings_s"] | {"load_model": round(load, 3)}
                rows.append((size, r, t, wall))
                print(f"  {size}^2 x {r['scan']['shape_kji'][0]}: {r['counts']['cmbs']} lesions, "
                      f"{r['counts']['slice_detections_kept']} kept slice detections, "
                      f"{r['counts']['slices_inferred']} slices searched; model: {what}")
    lines = [(f"cmbfe detect wall time per stage (s); torch {torch.__version__}, {args.threads} torch thread(s), "
             f"{os.cpu_count()} cores; model: {what}"), "",
             "| scan | " + " | ".join(STAGES) + " | end to end | target |", "|---|" + "---|" * (len(STAGES) + 2)]
    for size, r, t, wall in rows:
        nz = r["scan"]["shape_kji"][0]
        cells = " | ".join(f"{t.get(s, 0):.1f}" for s in STAGES)
        target = TARGET_S.get(size)
        verdict = f"<= {target:g} s: {'met' if wall <= target else 'MISSED'}" if target else ""
        lines.append(f"| {size}^2 x {nz} | {cells} | **{wall:.1f} s** | {verdict} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
