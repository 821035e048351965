"""Synthetic SWI cohort: a physics-based generator (recipe Tier B, simplified for speed).

Per patient (:func:`synthesize_patient`): the anatomy (:mod:`cmbfe.synth_anatomy`: warped MNI152 template,
head shell, deep-nuclei iron, air, veins), the susceptibility physics and acquisition
(:mod:`cmbfe.synth_physics`: FFT dipole field, GRE signal, sub-voxel spheres with blooming, bias, noise, SWI
phase mask, integers 0..4095) and the lesions (:mod:`cmbfe.synth_lesions`: CMBs, calcifications, vein
mimics). The cohort (:func:`synthesize_cohort`, ``cmbfe synth``) is written as DICOM series
(:mod:`cmbfe.dicom_write`) with ``lesions.csv``, ``mimics.csv`` and ``cohort.csv``.
Everything is deterministic from ``(cfg.seed, index)``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

from cmbfe.config import SynthConfig, load
from cmbfe.dicom_write import write_dicom_series
from cmbfe.errors import InputError
from cmbfe.synth_anatomy import (
    Z_MARGIN,
    Warp,
    anatomy,
    cache_file,
    draw_veins,
    geometry,
    splat_veins,
    template,
)
from cmbfe.synth_lesions import CALC_SITES, SynthLesion, place_cmbs, vein_dots
from cmbfe.synth_physics import GAMMA_MHZ_T, finish_swi, gre_signal, sphere_factor, to_output
from cmbfe.utils import atomic_path
from cmbfe.volume import Lesion, Volume, volume_slice_boxes


def synthesize_patient(index: int, cfg: SynthConfig, prefix: str = "SYN") -> Volume:
    """One synthetic SWI magnitude volume ``{prefix}-{index+1:04d}`` with its CMBs and mimics (deterministic
    in ``(cfg.seed, index)``; the prefix only names it)."""
    rng = np.random.default_rng([cfg.seed, index])
    g, tpl = geometry(cfg), template()
    warp = Warp(rng, cfg, g)
    w = 2 * np.pi * GAMMA_MHZ_T * cfg.field_t * cfg.te_ms * 1e-3  # rad per ppm
    an = anatomy(rng, cfg, g, warp, tpl)
    veins = draw_veins(rng, cfg, g, warp, tpl, an)
    frac, vchi = splat_veins(g, veins)
    an["chi"] = an["chi"] * (1 - frac) + vchi
    an["m0"] *= 1 - 0.2 * frac
    an["r2"] += 80.0 * frac
    cmbs = place_cmbs(rng, cfg, g, an, veins)
    wm_sl = an["wm"][Z_MARGIN : Z_MARGIN + 2 * g.nsl]
    sig, (wm,) = to_output(g, gre_signal(an, g, cfg, w), [0.5 * (wm_sl[0::2] + wm_sl[1::2])])
    iron_air = an.pop("mimics")
    del an
    lesions = []
    for n, (pt, a, dchi, loc) in enumerate(cmbs, 1):
        c = g.lps_to_out(pt)
        sl, f, diam = sphere_factor(c, a, dchi, g, w)
        sig[sl] *= f
        lesions.append(SynthLesion(n, tuple(float(v) for v in c), diam, "cmb", loc, radius_true_mm=a,
                                   dchi_ppm=dchi))
    found = []
    for _ in range(int(rng.integers(cfg.calcifications[0], cfg.calcifications[1] + 1))):
        site = list(CALC_SITES)[int(rng.integers(len(CALC_SITES)))]
        cc = np.array(CALC_SITES[site], float) * [rng.choice([-1, 1]), 1, 1] + rng.uniform(-2, 2, 3)
        a, dchi = float(rng.uniform(0.4, 1.5)), float(rng.uniform(-1.0, -0.3))
        pt = warp.to_lps(cc)[0]
        sl, f, diam = sphere_factor(g.lps_to_out(pt), a, dchi, g, w)
        sig[sl] *= f
        found.append(("calcification", site, pt, diam, a, dchi))
    data = finish_swi(rng, cfg, g, sig, wm)
    found += [(*m, float("nan"), float("nan")) for m in vein_dots(g, veins) + iron_air]
    mimics = []
    for kind, loc, pt, diam, a, dchi in found:
        c = g.lps_to_out(pt)
        if -0.5 <= c[2] < g.nsl - 0.5:
            mimics.append(SynthLesion(len(mimics) + 1, tuple(float(v) for v in c), float(diam), kind, loc,
                                      radius_true_mm=a, dchi_ppm=dchi))
    return Volume(data, g.affine.copy(), f"{prefix}-{index + 1:04d}", lesions, mimics, source="cmbfe.synth")


LESION_COLUMNS = ["lesion_id", "patient_id", "kind", "location", "i", "j", "k", "x_mm", "y_mm", "z_mm",
                  "diameter_mm", "radius_true_mm", "dchi_ppm"]
MIMIC_COLUMNS = ["mimic_id", "patient_id", "kind", "location", "i", "j", "k", "x_mm", "y_mm", "z_mm",
                 "diameter_mm"]
COHORT_COLUMNS = ["patient_id", "n_slices", "n_cmb", "seed"]


def _table(vol: Volume, objs: list[Lesion], columns: list[str]) -> pd.DataFrame:
    rows = []
    for o in objs:
        ijk = np.array(o.centre_vox, float)
        xyz = vol.vox_to_mm(ijk)
        row = [o.lesion_id, vol.patient_id, o.kind, o.location, *np.round(ijk, 3), *np.round(xyz, 3),
               round(o.diameter_mm, 3), round(float(getattr(o, "radius_true_mm", np.nan)), 4),
               round(float(getattr(o, "dchi_ppm", np.nan)), 4)]
        rows.append(row[: len(columns)])
    return pd.DataFrame(rows, columns=columns)


def lesion_table(vol: Volume) -> pd.DataFrame:
    """The volume's CMBs as rows of ``lesions.csv`` (voxel i, j, k and LPS mm)."""
    return _table(vol, vol.lesions, LESION_COLUMNS)


def mimic_table(vol: Volume) -> pd.DataFrame:
    """The volume's mimics as rows of ``mimics.csv``."""
    return _table(vol, vol.mimics, MIMIC_COLUMNS)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    template()


def _write_patient(index: int, cfg: SynthConfig, root: str, prefix: str = "SYN") -> dict:
    """Synthesize one patient and write its DICOM series and CSVs under ``root``; return its stats."""
    t = time.perf_counter()
    vol = synthesize_patient(index, cfg, prefix)
    pdir = Path(root) / vol.patient_id
    write_dicom_series(vol, pdir / "dicom", uid_seed=f"cmbfe-synth-{cfg.seed}-{vol.patient_id}",
                       echo_time_ms=cfg.te_ms, field_t=cfg.field_t)
    lesion_table(vol).to_csv(pdir / "lesions.csv", index=False)
    mimic_table(vol).to_csv(pdir / "mimics.csv", index=False)
    boxes = volume_slice_boxes(vol)
    return {"patient_id": vol.patient_id, "n_slices": vol.shape[0], "n_cmb": len(vol.lesions),
            "seed": cfg.seed,
            "n_cmb_boxes": sum(len(b) for b in boxes.values()), "n_cmb_slices": len(boxes),
            "n_mimics": len(vol.mimics), "seconds": round(time.perf_counter() - t, 3)}


def synthesize_cohort(
    out_dir: Path, cfg: SynthConfig, progress: bool = True, overwrite: bool = False, prefix: str = "SYN"
) -> pd.DataFrame:
    """Write the cohort (``SYN-xxxx/dicom``, ``lesions.csv``, ``mimics.csv``, ``cohort.csv``) atomically;
    ``prefix`` names the patients (``HOLD`` for the hold-out cohort, :mod:`cmbfe.holdout`).

    Built in a temp sibling folder and renamed at the end; an existing non-empty ``out_dir`` is an
    error unless ``overwrite``. Returns the cohort table (the ``cohort.csv`` columns plus per-patient
    ``n_cmb_boxes``, ``n_cmb_slices``, ``n_mimics``, ``seconds``).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir}: exists and is not empty (use --overwrite to replace it)")
    if cfg.workers > 1 and cfg.patients > 1 and not cache_file().is_file():
        template()  # build the disk cache once, not in every worker
    rows = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        bar = tqdm(total=cfg.patients, desc="synth", unit="patient", disable=not progress)
        if cfg.workers <= 1 or cfg.patients == 1:
            for i in range(cfg.patients):
                rows.append(_write_patient(i, cfg, str(tmp), prefix))
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")  # torch/OpenMP are not fork-safe
            ex = ProcessPoolExecutor(min(cfg.workers, cfg.patients), mp_context=ctx, initializer=_init_worker)
            try:
                futs = [ex.submit(_write_patient, i, cfg, str(tmp), prefix) for i in range(cfg.patients)]
                for fut in as_completed(futs):
                    rows.append(fut.result())
                    bar.update()
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
        bar.close()
        df = pd.DataFrame(rows).sort_values("patient_id").reset_index(drop=True)
        df[COHORT_COLUMNS].to_csv(tmp / "cohort.csv", index=False)
    return df


def main(argv: list[str] | None = None) -> int:
    """``cmbfe synth --out DIR [--params P] [--patients N] [--seed S] [--matrix M] [--workers W]
    [--overwrite]``; prints one summary line."""
    ap = argparse.ArgumentParser(prog="cmbfe synth",
                                 description="Generate the synthetic SWI cohort (DICOM + ground truth).")
    ap.add_argument("--out", required=True, type=Path, help="output folder (created atomically)")
    ap.add_argument("--params", default=None, help="profile name (smoke/default/paper) or params YAML file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. synth.snr=[30,40]")
    ap.add_argument("--patients", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--matrix", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    flags = [f"synth.{k}={getattr(args, k)}" for k in ("patients", "seed", "matrix", "workers")
             if getattr(args, k) is not None]  # synth.* overrides, checked with the profile at load
    cfg = load(args.params, [*args.set, *flags]).synth
    t = time.perf_counter()
    df = synthesize_cohort(args.out, cfg, progress=not args.quiet, overwrite=args.overwrite)
    print(f"synth: {len(df)} patients, {int(df.n_cmb.sum())} CMBs, {int(df.n_cmb_boxes.sum())} CMB boxes on "
          f"{int(df.n_cmb_slices.sum())} slices, {time.perf_counter() - t:.1f} s -> {args.out}")
    return 0
