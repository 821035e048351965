"""``cmbfe detect``: a scan in, a CMB report out.

Usage::

    cmbfe detect INPUT --out DIR [--model M] [--operating-point screening|balanced] [--threshold T]
                 [--device D] [--overwrite] [--series UID]

``INPUT`` is a DICOM series folder (files directly in it, or in ``INPUT/dicom/``), a NIfTI file (any 3D
SWI / T2* magnitude; VALDO names work), or a folder of patients (one sub-folder, NIfTI file or VALDO
subject each: one report folder per patient plus ``DIR/cohort.csv``); see :mod:`cmbfe.detect.scans`. Per
scan, ``DIR`` (or ``DIR/<patient>/``) gets ``cmbs.csv``, ``cmbs_mask.nii.gz``, ``detections.json``,
``report.json``, ``report.pdf`` and ``report.html`` (:data:`cmbfe.detect.outputs.OUTPUTS`); ``DIR`` is built
in a temp sibling and renamed at the end, so a failed run leaves nothing.

The model (:mod:`cmbfe.detect.detector`) is an exported model folder (default ``models/``) or a training
run folder; the pipeline is :mod:`cmbfe.detect.pipeline`, the report :mod:`cmbfe.detect.report`. A model
folder with a second stage (:mod:`cmbfe.detect.stage2`) keeps the 3D candidates its classifier accepts at the
operating point ``screening`` (lesion sensitivity >= 0.9 on the validation split) or ``balanced`` (best
lesion F1 there; the default); ``--threshold T`` runs the detector alone at T instead.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from cmbfe.detect.detector import Detector, load_detector
from cmbfe.detect.outputs import write_scan_outputs
from cmbfe.detect.pipeline import detect_scan
from cmbfe.detect.scans import find_scans
from cmbfe.errors import ConfigError, InputError
from cmbfe.runtime import apply_thread_env
from cmbfe.utils import atomic_path, atomic_write_text

COHORT_COLUMNS = ["patient", "input", "kind", "n_cmb", "slices_with_cmb", "max_score", "threshold", "seconds",
                  "report"]


def run_detect(input_path: str | Path, out_dir: str | Path, *, model: str | Path | Detector | None = None,
               threshold: float | None = None, device: str = "auto", overwrite: bool = False,
               series_uid: str | None = None, on_bad_file: str = "fail", batch_size: int = 8,
               report: bool = True, log: Any = None, operating_point: str | None = None) -> dict[str, Any]:
    """``cmbfe detect`` as a function: returns ``{"out", "cohort", "scans": [report.json dicts],
    "detector"}``.

    ``model``: a folder/``.pt`` path (default ``models/``) or an already loaded :class:`Detector`.
    """
    from cmbfe.runtime import resolve_device

    src, out = Path(input_path).resolve(), Path(out_dir).resolve()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists (use --overwrite to replace it)")
    if src.is_dir() and out.is_relative_to(src):
        raise InputError(f"{out}: output folder must not be inside the input folder {src}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    scans, cohort = find_scans(src)
    if series_uid is not None and (cohort or scans[0].kind != "dicom"):
        raise InputError(f"{src}: --series selects a series in one DICOM folder; INPUT is not one")
    apply_thread_env()
    dev = resolve_device(device)
    t0 = time.perf_counter()
    det = model if isinstance(model, Detector) else load_detector(model, threshold=threshold, device=dev,
                                                                  operating_point=operating_point)
    if isinstance(model, Detector) and threshold is not None:
        det.threshold, det.threshold_source = float(threshold), "--threshold"
    load_s = round(time.perf_counter() - t0, 3)
    results = []
    rows = []
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for n, scan in enumerate(scans):
            ts = time.perf_counter()
            res = detect_scan(scan, det, series_uid=series_uid, on_bad_file=on_bad_file,
                              batch_size=batch_size, device=dev)
            folder = tmp / scan.name if cohort else tmp
            folder.mkdir(parents=True, exist_ok=True)
            rel = scan.path.relative_to(src) if scan.path.is_relative_to(src) else scan.path
            extra = {"load_model": load_s} if n == 0 else {}
            summary = write_scan_outputs(res, det, folder, input_path=str(rel) if cohort else str(src),
                                         report=report, extra_timings=extra)
            results.append(summary)
            rows.append({"patient": scan.name, "input": str(rel), "kind": scan.kind,
                         "n_cmb": len(res.lesions), "slices_with_cmb": summary["counts"]["slices_with_cmb"],
                         "max_score": round(float(res.scores.max()), 4) if len(res.scores) else 0.0,
                         "threshold": det.threshold, "seconds": round(time.perf_counter() - ts, 2),
                         "report": f"{scan.name}/report.html" if cohort else "report.html"})
            if log is not None:
                log(f"{scan.name}: {len(res.lesions)} CMB(s) at {_rule(det)} "
                    f"({time.perf_counter() - ts:.1f} s)")
        if cohort:
            table = pd.DataFrame(rows, columns=COHORT_COLUMNS)
            atomic_write_text(tmp / "cohort.csv", table.to_csv(index=False))
    return {"out": out, "cohort": cohort, "scans": results, "detector": det}


def _rule(det: Detector) -> str:
    if det.stage2 is not None:
        thr = det.stage2.threshold(det.operating_point)
        return f"operating point {det.operating_point} (second stage >= {thr:.3g})"
    return f"threshold {det.threshold:.3g}"


def main(argv: list[str] | None = None) -> int:
    """``cmbfe detect INPUT --out DIR [--model M] [--threshold T] [--device D] [--overwrite]
    [--series UID]``."""
    ap = argparse.ArgumentParser(prog="cmbfe detect", description=__doc__.split("\n\n")[0].replace("``", ""))
    ap.add_argument("input", type=Path, help="DICOM series folder, NIfTI file, or folder of patients")
    ap.add_argument("--out", required=True, type=Path, help="report folder to create")
    ap.add_argument("--model", type=Path, default=None,
                    help="exported model folder or training run folder (default: models/)")
    ap.add_argument("--operating-point", choices=("screening", "balanced"), default=None,
                    help="second stage: screening (sensitivity >= 0.9 on val) or balanced (best F1 on val; "
                         "default)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="run the detector alone at this score threshold (default: the model's second stage, "
                         "or its stored threshold)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--series", default=None, metavar="UID",
                    help="SeriesInstanceUID when a folder holds several")
    ap.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail",
                    help="non-image or unreadable files in a DICOM folder: fail (default) or skip")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-report", action="store_true", help="skip report.pdf / report.html")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. torchvision's antialias notes
        r = run_detect(args.input, args.out, model=args.model, threshold=args.threshold, device=args.device,
                       overwrite=args.overwrite, series_uid=args.series, on_bad_file=args.on_bad_file,
                       batch_size=args.batch_size, report=not args.no_report,
                       operating_point=args.operating_point,
                       log=lambda s: print(f"cmbfe detect: {s}", flush=True))
    n = sum(s["counts"]["cmbs"] for s in r["scans"])
    det: Detector = r["detector"]
    src = {"model": "the model's", "--threshold": "--threshold", "fallback": "fallback"}[det.threshold_source]
    how = _rule(det) if det.stage2 is not None else f"threshold {det.threshold:.3g} ({src})"
    print(f"cmbfe detect: {len(r['scans'])} scan(s), {n} CMB(s), model {det.name}, {how}, "
          f"in {time.perf_counter() - t0:.1f} s -> {r['out']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
