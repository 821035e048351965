"""Time the synthetic cohort generator and extrapolate to the default 58-patient cohort.

    .venv/bin/python benchmarks/bench_synth.py [--patients 4] [--matrix 256] [--workers W] [--full]
    .venv/bin/python benchmarks/bench_synth.py --figure figures/synthetic_slices.png [--figure-patient 27]

Generates ``--patients`` patients (DICOM + CSVs, into a temp folder) with ``cfg.workers`` processes,
prints seconds per patient (wall and per worker) and the projected 58-patient wall time. ``--full``
also runs the whole default cohort and prints its statistics (CMBs, CMB boxes/slices, mean apparent
diameter, location mix, mimics). ``--figure`` only draws three slices of one default-profile patient
with its CMB boxes (red) and mimic boxes (other colours).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmbfe.config import load
from cmbfe.synth import synthesize_cohort


def run(n: int, matrix: int, workers: int | None, params: str) -> tuple:
    """Generate ``n`` patients into a temp folder: (cohort table, wall s, out dir, temp dir handle)."""
    cfg = load(params).synth
    cfg.patients, cfg.matrix = n, matrix
    if workers is not None:
        cfg.workers = workers
    tmp = tempfile.TemporaryDirectory(prefix="bench_synth_")
    out = Path(tmp.name) / "raw"
    t = time.perf_counter()
    df = synthesize_cohort(out, cfg, progress=False)
    return df, time.perf_counter() - t, out, tmp


def figure(path: Path, number: int, params: str = "default") -> None:
    """Three slices (lowest, middle, highest third with the most CMB boxes) of patient SYN-``number``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    from cmbfe.synth import synthesize_patient
    from cmbfe.volume import volume_slice_boxes

    vol = synthesize_patient(number - 1, load(params).synth)
    cmb, mim = volume_slice_boxes(vol), volume_slice_boxes(vol, "*")
    kind = {m.lesion_id: m.kind for m in vol.mimics}
    colour = {"vein": "cyan", "calcification": "yellow", "iron": "lime", "air": "magenta"}
    nsl = vol.shape[0]
    thirds = [range(nsl // 3), range(nsl // 3, 2 * nsl // 3), range(2 * nsl // 3, nsl)]
    ks = [max(t, key=lambda k: (len(cmb.get(k, [])), -abs(k - t[len(t) // 2]))) for t in thirds]
    vmax = float(np.percentile(vol.data, 99.5))
    fig, axs = plt.subplots(1, 3, figsize=(15, 5.6))
    for ax, k in zip(axs, ks):
        ax.imshow(vol.data[k], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        for lid, (x0, y0, x1, y1) in mim.get(k, []):
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=0.6,
                                   ec=colour[kind[lid]]))
        for _, (x0, y0, x1, y1) in cmb.get(k, []):
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.0, ec="red"))
        z = vol.vox_to_mm([0, 0, k])[2]
        n = len(cmb.get(k, []))
        ax.set_title(f"{vol.patient_id} slice {k} (z = {z:.0f} mm): {n} CMB boxes", fontsize=10)
        ax.axis("off")
    legend = [("cmb", "red"), *colour.items()]
    handles = [Rectangle((0, 0), 1, 1, fill=False, ec=c, label=n) for n, c in legend]
    fig.legend(handles=handles, loc="lower center", ncol=5, frameon=False)
    fig.suptitle("Synthetic SWI (default profile, 256x256, 2 mm slices): CMBs red, mimics by kind")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    print(f"figure: {path} (slices {ks})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="default: the profile's synth.workers")
    ap.add_argument("--params", default="default")
    ap.add_argument("--full", action="store_true",
                    help="also run the full cohort of the profile and print its statistics")
    ap.add_argument("--figure", type=Path, help="only draw the figure of --figure-patient to this PNG")
    ap.add_argument("--figure-patient", type=int, default=27, help="patient number (SYN-xxxx) for --figure")
    args = ap.parse_args(argv)
    if args.figure:
        figure(args.figure, args.figure_patient, args.params)
        return 0
    cfg = load(args.params).synth
    workers = args.workers if args.workers is not None else cfg.workers
    df, wall, _, tmp = run(args.patients, args.matrix, workers, args.params)
    tmp.cleanup()
    per = df.seconds.mean()
    w = max(1, min(workers, args.patients))
    # pool start-up (imports, template cache) is paid once per worker: wall minus the per-patient work
    startup = max(0.0, wall - math.ceil(args.patients / w) * per)
    proj = startup + math.ceil(58 / w) * per
    print(f"synth bench: {args.patients} patients, matrix {args.matrix}, {w} worker(s): wall {wall:.1f} s, "
          f"{per:.2f} s per patient in a worker (incl. DICOM), start-up ~{startup:.1f} s")
    print(f"projected 58 patients: {proj:.0f} s ({proj / 60:.1f} min)")
    if args.full:
        cfg = load(args.params).synth
        df, wall, out, tmp = run(cfg.patients, cfg.matrix, workers, args.params)
        les = pd.concat([pd.read_csv(p) for p in sorted(out.glob("SYN-*/lesions.csv"))])
        mim = pd.concat([pd.read_csv(p) for p in sorted(out.glob("SYN-*/mimics.csv"))])
        nb, ns = int(df.n_cmb_boxes.sum()), int(df.n_cmb_slices.sum())
        print(f"full {args.params}: {len(df)} patients in {wall:.0f} s; {int(df.n_cmb.sum())} CMBs, "
              f"{nb} CMB boxes on {ns} slices; patients without CMBs {int((df.n_cmb == 0).sum())}; "
              f"CMBs per patient median {df.n_cmb.median():.0f}, max {df.n_cmb.max()}")
        d = les.diameter_mm.astype(float)
        q = d.quantile([0.05, 0.5, 0.95]).round(2).tolist()
        print(f"apparent diameter mm: mean {d.mean():.2f}, 5/50/95% {q}")
        print("locations:", (les.location.value_counts(normalize=True).round(3)).to_dict())
        print("mimics per patient:", (mim.kind.value_counts() / len(df)).round(1).to_dict())
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
