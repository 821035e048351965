"""Time N4 bias correction and whole-patient preprocessing; extrapolate to a 58-patient cohort.

    .venv/bin/python benchmarks/bench_preprocess.py [--size 256] [--slices 63] [--iterations 20,20,10]
        [--shrink 4 2] [--patients 2] [--workers W] [--params default] [--synth]

1. N4 (``cmbfe.preprocess.n4``) on one ``size x size x slices`` volume (2 mm slices, 240 mm FOV) at
   each ``--shrink``, with ``--iterations``: seconds per volume, and the bias field's largest relative
   deviation inside the head from the first shrink's (a quality check of the cheaper settings).
2. ``preprocess_cohort`` on ``--patients`` patients (DICOM + CSVs in a temp folder) with the profile's
   preprocess settings: seconds per patient (read / N4 / write) and the projected 58-patient wall time.
The volume is an ellipsoidal phantom with a smooth bias and dark spots, or with ``--synth`` a patient of
``cmbfe.synth`` (the real texture; slower to make).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmbfe import config
from cmbfe.dicom_write import write_dicom_series
from cmbfe.preprocess import head_mask, n4, preprocess_cohort
from cmbfe.volume import Lesion, Volume


def phantom(size: int, slices: int, seed: int = 0) -> Volume:
    """Ellipsoidal head (bias 0.7..1.3 across it, Rayleigh background, 20 dark 3 mm spots) as a Volume."""
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[:slices, :size, :size].astype(np.float32)
    head = ((i - size / 2) / (0.4 * size)) ** 2 + ((j - size / 2) / (0.45 * size)) ** 2 + \
        ((k - slices / 2) / (0.55 * slices)) ** 2 < 1
    bias = 1 + 0.3 * (i / size - 0.5) * 2 - 0.2 * (k / slices - 0.5)
    data = head * 800.0 * bias + rng.rayleigh(20, head.shape)
    px = 240.0 / size
    les = []
    for n in range(20):
        c = (rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * slices)
        r2 = ((i - c[0]) * px) ** 2 + ((j - c[1]) * px) ** 2 + ((k - c[2]) * 2.0) ** 2
        data[r2 < 1.5**2] *= 0.2
        les.append(Lesion(n + 1, c, 3.0))
    aff = np.diag([px, px, 2.0, 1.0])
    return Volume(np.round(data).astype(np.float32), aff, f"BENCH-{seed + 1:04d}", les)


def make_volume(size: int, slices: int, seed: int, use_synth: bool) -> Volume:
    if not use_synth:
        return phantom(size, slices, seed)
    from cmbfe.synth import synthesize_patient

    scfg = config.load("default").synth
    scfg.matrix = size
    return synthesize_patient(seed, scfg)


def bench_n4(vol: Volume, iterations: list[int], shrinks: list[int]) -> None:
    import ants  # noqa: F401 - imported here so its start-up (~3 s) is not timed

    mask = head_mask(vol.data) & (vol.data > 0)
    fields = {}
    for s in shrinks:
        t = time.perf_counter()
        out = n4(vol.data, vol.spacing_mm, iterations, s, mask=mask)
        dt = time.perf_counter() - t
        field = np.where(mask, vol.data / np.maximum(out, 1e-6), 1.0)
        fields[s] = field / field[mask].mean()
        print(f"N4 {vol.shape[2]}x{vol.shape[1]}x{vol.shape[0]}, iterations {iterations}, shrink {s}: "
              f"{dt:.2f} s per volume", flush=True)
    best = min(shrinks)
    for s in shrinks:
        if s != best:
            dev = 100 * float(np.abs(fields[s] / fields[best] - 1)[mask].max())
            print(f"  bias field at shrink {s} within {dev:.1f} % of shrink {best}'s (max over the head)")


def bench_patients(n: int, size: int, slices: int, use_synth: bool, params: str, workers: int | None) -> None:
    cfg = config.load(params)
    if workers is not None:
        cfg.preprocess.workers = workers
    with tempfile.TemporaryDirectory(prefix="bench_pre_") as tmp:
        raw = Path(tmp) / "raw"
        for s in range(n):
            vol = make_volume(size, slices, s, use_synth)
            write_dicom_series(vol, raw / vol.patient_id / "dicom", uid_seed=f"bench-{s}")
            rows = [f"{x.lesion_id},{vol.patient_id},cmb,,{','.join(map(str, x.centre_vox))},{x.diameter_mm}"
                    for x in vol.lesions]
            (raw / vol.patient_id / "lesions.csv").write_text(
                "lesion_id,patient_id,kind,location,i,j,k,diameter_mm\n" + "\n".join(rows) + "\n")
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # phantom cohorts have no mimics for the test negatives
            preprocess_cohort(raw, Path(tmp) / "pre", cfg, progress=False)
        wall = time.perf_counter() - t
        meta = json.loads((Path(tmp) / "pre" / "preprocess.json").read_text())
    secs = [p["seconds"] for p in meta["patients"]]
    mean = {k: float(np.mean([s[k] for s in secs])) for k in ("read", "n4", "write", "total")}
    w = max(1, min(cfg.preprocess.workers, n))
    startup = max(0.0, wall - math.ceil(n / w) * mean["total"])
    proj = startup + math.ceil(58 / w) * mean["total"]
    p = cfg.preprocess
    print(f"preprocess ({params}: N4 {list(p.n4_iterations)} shrink {p.n4_shrink}), {n} patients "
          f"{size}x{size}x{vol.shape[0]}, {w} worker(s), {os.cpu_count()} CPUs, ITK threads "
          f"{os.environ.get('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS')}: wall {wall:.1f} s; per patient "
          f"read {mean['read']:.2f} s, N4 {mean['n4']:.2f} s, write {mean['write']:.2f} s, "
          f"total {mean['total']:.2f} s")
    print(f"projected 58 patients: {proj:.0f} s ({proj / 60:.1f} min)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=63)
    ap.add_argument("--iterations", default="20,20,10", help="N4 iterations per level, comma-separated")
    ap.add_argument("--shrink", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--patients", type=int, default=2, help="0 skips the per-patient benchmark")
    ap.add_argument("--workers", type=int, default=None, help="default: the profile's preprocess.workers")
    ap.add_argument("--params", default="default")
    ap.add_argument("--synth", action="store_true", help="use cmbfe.synth patients instead of the phantom")
    args = ap.parse_args(argv)
    iterations = [int(x) for x in args.iterations.split(",")]
    bench_n4(make_volume(args.size, args.slices, 0, args.synth), iterations, args.shrink)
    if args.patients > 0:
        bench_patients(args.patients, args.size, args.slices, args.synth, args.params, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
