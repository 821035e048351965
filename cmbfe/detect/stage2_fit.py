"""Training the second stage (:mod:`cmbfe.detect.stage2`) for a detector and choosing its operating points.

:func:`train_stage2` is the one entry point: the study's shipping code (:func:`cmbfe.study.ship.ship_model`)
calls it for the exported detector, and ``python -m cmbfe.detect.stage2_fit MODEL --raw RAW --pre PRE``
rebuilds it. Candidates come from running the detector on each scan of the training split (``RAW/<patient>``
with ``lesions.csv`` and ``mimics.csv``, the split from ``PRE/splits.csv``); the operating points are chosen
on
the validation split's scans, at the lesion level (a true CMB is found when a kept candidate's centre lies
within 3 mm; one-to-one matching, :func:`cmbfe.detect.lesion_metrics.match_centres`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmbfe.detect import stage2 as S
from cmbfe.detect.detector import Detector
from cmbfe.detect.lesion_metrics import match_centres, valdo_metrics
from cmbfe.errors import InputError

SCREENING_SENSITIVITY = 0.9


@dataclasses.dataclass
class Candidates:
    """The 3D candidates of a set of scans: patches, features, centres (LPS mm), patient, label, and each
    patient's true CMB centres."""

    x: np.ndarray
    f: np.ndarray
    centre_mm: np.ndarray
    patient: np.ndarray
    label: np.ndarray
    truth: dict[str, np.ndarray]
    seconds: float = 0.0


def scan_detections(det: Detector, folder: Path, cache: Path | None = None) -> dict[str, np.ndarray]:
    """The detector's slice detections on one scan with the 8-bit volume they came from (``u8``, ``boxes``,
    ``slices``, ``scores``, ``affine``, ``spacing``); read from / written to ``cache/<patient>.npz`` when a
    cache folder is given (the detections do not depend on any threshold)."""
    from cmbfe.detect.pipeline import detect_scan
    from cmbfe.detect.scans import find_scans

    path = cache / f"{folder.name}.npz" if cache is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in ("u8", "boxes", "slices", "scores", "affine", "spacing")}
    res = detect_scan(find_scans(folder)[0][0], dataclasses.replace(det, stage2=None))
    out = {
        "u8": res.u8,
        "boxes": res.boxes,
        "slices": res.slices,
        "scores": res.scores,
        "affine": res.vol.affine,
        "spacing": np.array(res.vol.spacing_mm),
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(tmp, **out)
        tmp.replace(path)
    return out


def collect(
    det: Detector,
    raw: str | Path,
    patients: list[str],
    *,
    threshold: float = S.CANDIDATE_THRESHOLD,
    cache: str | Path | None = None,
    log: Any = None,
) -> Candidates:
    """Run the detector (no second stage) on ``RAW/<patient>`` (:func:`scan_detections`), link its boxes at
    ``threshold`` into 3D candidates and gather them; ``label`` 1 when the centre is within
    :data:`cmbfe.detect.stage2.MATCH_MM` of a true CMB."""
    from cmbfe.detect.pipeline import merge_lesions

    xs, fs, cs, ps, truth = [], [], [], [], {}
    t0 = time.perf_counter()
    for n, p in enumerate(patients):
        folder = Path(raw) / p
        if not (folder / "lesions.csv").is_file():
            raise InputError(
                f"{folder / 'lesions.csv'}: not found (the second stage trains on synthetic "
                "patients with their truth)"
            )
        d = scan_detections(det, folder, Path(cache) if cache is not None else None)
        _, lesions = merge_lesions(
            d["boxes"],
            d["slices"],
            d["scores"],
            d["scores"] >= threshold,
            d["u8"].shape[0],
            tuple(d["spacing"]),
        )
        truth[p] = (
            pd.read_csv(folder / "lesions.csv")[["x_mm", "y_mm", "z_mm"]].to_numpy(float).reshape(-1, 3)
        )
        xs.append(S.patches(d["u8"], lesions))
        fs.append(S.features(d["scores"], d["slices"], lesions))
        cen = np.array([d["affine"] @ np.append(les["centre_vox"], 1.0) for les in lesions]).reshape(-1, 4)
        cs.append(cen[:, :3])
        ps.append(np.full(len(lesions), p, dtype=object))
        if log is not None:
            log(f"second stage candidates {n + 1}/{len(patients)} {p}: {len(lesions)}")
    cen = np.concatenate(cs) if cs else np.zeros((0, 3))
    pat = np.concatenate(ps) if ps else np.zeros(0, object)
    label = np.zeros(len(cen), np.int64)
    for p, t in truth.items():
        i = np.flatnonzero(pat == p)
        if len(t) and len(i):
            label[i] = (np.linalg.norm(cen[i][:, None] - t[None], axis=2).min(1) < S.MATCH_MM).astype(
                np.int64
            )
    return Candidates(
        np.concatenate(xs) if xs else np.zeros((0, *S.PATCH), np.float32),
        np.concatenate(fs) if fs else np.zeros((0, len(S.FEATURES)), np.float32),
        cen,
        pat,
        label,
        truth,
        time.perf_counter() - t0,
    )


def lesion_counts(
    c: Candidates, prob: np.ndarray, thr: float, distance_mm: float = S.MATCH_MM
) -> tuple[int, int, int]:
    """``(found, true CMBs, false positives)`` over the patients of ``c`` keeping ``prob >= thr``."""
    found = n_true = fp = 0
    for p, t in c.truth.items():
        keep = (c.patient == p) & (prob >= thr)
        tp, _ = match_centres(c.centre_mm[keep], t, distance_mm)
        found, n_true, fp = found + tp, n_true + len(t), fp + int(keep.sum()) - tp
    return found, n_true, fp


def choose_operating_points(c: Candidates, prob: np.ndarray) -> dict[str, dict[str, Any]]:
    """``screening``: the highest probability threshold with lesion sensitivity >= 0.9 (the lowest one
    reaching the most CMBs when none does); ``balanced``: the threshold with the best pooled lesion F1
    (ties: the higher). Each with its sensitivity, FP per scan and F1 on ``c`` (the validation split)."""
    rows = []
    for thr in np.unique(np.round(prob, 6))[::-1]:
        found, n_true, fp = lesion_counts(c, prob, float(thr))
        f1 = 2 * found / (2 * found + fp + (n_true - found)) if n_true + found + fp else 0.0
        rows.append((float(thr), found / max(n_true, 1), fp / max(len(c.truth), 1), f1))
    if not rows:
        raise ValueError("second stage: no validation candidates to choose an operating point on")
    t = pd.DataFrame(rows, columns=["threshold", "sensitivity", "fp_per_scan", "f1"])
    ok = t[t["sensitivity"] >= SCREENING_SENSITIVITY]
    scr = ok.iloc[0] if len(ok) else t[t["sensitivity"] == t["sensitivity"].max()].iloc[0]
    bal = t[t["f1"] == t["f1"].max()].iloc[0]
    out = {}
    for name, r, rule in (
        ("screening", scr, f"lesion sensitivity >= {SCREENING_SENSITIVITY:g} on val"),
        ("balanced", bal, "best lesion F1 on val"),
    ):
        out[name] = {
            "threshold": round(float(r["threshold"]), 6),
            "rule": rule,
            "val_sensitivity": round(float(r["sensitivity"]), 4),
            "val_fp_per_scan": round(float(r["fp_per_scan"]), 3),
            "val_f1": round(float(r["f1"]), 4),
            "reached": bool(name == "balanced" or len(ok)),
        }
    return out


def read_splits(pre: str | Path) -> dict[str, list[str]]:
    """``{split: [patient, ...]}`` from ``PRE/splits.csv``; InputError naming the file."""
    path = Path(pre) / "splits.csv"
    try:
        t = pd.read_csv(path, dtype=str)
        return {s: sorted(t.loc[t["split"] == s, "patient_id"]) for s in ("train", "val", "test")}
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"{path}: cannot read the patient split ({type(e).__name__})") from None


def train_stage2(
    det: Detector,
    raw: str | Path,
    pre: str | Path,
    *,
    seed: int = 0,
    epochs: int = 25,
    cache: str | Path | None = None,
    log: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the second stage for ``det`` on the training split's candidates and choose its operating points
    on the validation split's (module docstring); the test split's VALDO lesion metrics per operating point
    are recorded (``test``, :func:`split_metrics`). Returns ``(state dict, detect.json stage2 entry)``; write
    them with :func:`cmbfe.modelfolder.write_stage2`. ``cache``: a folder for the detector's outputs per
    scan (:func:`scan_detections`), so that a rebuild does not rerun the detector."""
    import torch

    splits = read_splits(pre)
    tr = collect(det, raw, splits["train"], cache=cache, log=log)
    va = collect(det, raw, splits["val"], cache=cache, log=log)
    t0 = time.perf_counter()
    net = S.train_net(tr.x, tr.f, tr.label, seed=seed, epochs=epochs, log=log)
    train_s = time.perf_counter() - t0
    prob = S.predict(net, va.x, va.f)
    ops = choose_operating_points(va, prob)
    found, n_true, _ = lesion_counts(va, np.ones(len(prob)), 0.0)
    te = collect(det, raw, splits["test"], cache=cache, log=log) if splits["test"] else None
    meta = {
        "format": S.FORMAT,
        "architecture": "3D CNN (3 conv layers, width 8) on a 5x16x16 voxel patch + "
        f"{len(S.FEATURES)} candidate features",
        "patch_kji": list(S.PATCH),
        "features": list(S.FEATURES),
        "width": 8,
        "candidate_threshold": S.CANDIDATE_THRESHOLD,
        "match_mm": S.MATCH_MM,
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "seed": seed,
        "epochs": epochs,
        "default_operating_point": "balanced",
        "operating_points": ops,
        "training": {
            "split": "train",
            "patients": len(splits["train"]),
            "candidates": len(tr.label),
            "positives": int(tr.label.sum()),
            "seconds_candidates": round(tr.seconds, 1),
            "seconds_training": round(train_s, 1),
        },
        "validation": {
            "split": "val",
            "patients": len(splits["val"]),
            "candidates": len(va.label),
            "cmbs": n_true,
            "cmbs_among_candidates": found,
        },
        "torch": torch.__version__,
    }
    if te is not None:
        meta["test"] = split_metrics(te, S.predict(net, te.x, te.f), ops)
    return net.state_dict(), meta


CARD_HEADING = "## Second stage"


def split_metrics(c: Candidates, prob: np.ndarray, ops: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per operating point, the VALDO lesion metrics (:func:`cmbfe.detect.lesion_metrics.valdo_metrics`) of
    the kept candidates of ``c`` at 3 and 5 mm: sensitivity, FP per scan / per CMB-free scan, precision,
    median F1 and absolute count difference."""
    out: dict[str, Any] = {"patients": len(c.truth), "cmbs": int(sum(len(t) for t in c.truth.values())),
                           "cmb_free": int(sum(len(t) == 0 for t in c.truth.values()))}
    for name, o in ops.items():
        keep = prob >= o["threshold"]
        subj = {p: (c.centre_mm[keep & (c.patient == p)], t) for p, t in c.truth.items()}
        v3, v5 = valdo_metrics(subj, 3.0), valdo_metrics(subj, 5.0)
        out[name] = {"sensitivity_3mm": v3["sensitivity"], "fp_per_scan": v3["fp_per_subject"],
                     "fp_per_cmb_free_scan": v3["fp_per_cmb_free_subject"], "precision_3mm": v3["precision"],
                     "median_f1_5mm": v5["median_f1"], "median_f1_3mm": v3["median_f1"],
                     "abs_count_difference": v5["abs_count_difference"]}
    return out


def card_section(meta: dict[str, Any]) -> str:
    """The model card's section on the second stage (architecture, training data, operating points)."""
    tr, va, ops = meta["training"], meta["validation"], meta["operating_points"]
    lines = [
        CARD_HEADING,
        (f"- {meta['architecture']} ({meta['parameters']:,} weights, `stage2.pt`, loaded with "
         "`weights_only=True`; settings in `detect.json` -> `stage2`)."),
        (f"- Candidates: the detector's slice boxes with score >= {meta['candidate_threshold']:g}, linked "
         "into 3D candidates (same and adjacent slices); each is kept when the second stage's probability "
         "reaches the operating point's threshold."),
        (f"- Trained on the training split's candidates ({tr['patients']} patients, {tr['candidates']:,} "
         f"candidates, {tr['positives']} within {meta['match_mm']:g} mm of a true CMB; the rest, labelled "
         f"mimics among them, negatives), seed {meta['seed']}, {meta['epochs']} epochs, "
         f"{tr['seconds_training']:.0f} s on CPU."),
        (f"- Operating points, chosen on the validation split ({va['patients']} patients, {va['cmbs']} CMBs, "
         f"{va['cmbs_among_candidates']} among the candidates; a CMB is found when a kept centre lies within "
         f"{meta['match_mm']:g} mm); `cmbfe detect --operating-point` picks one "
         f"(default `{meta['default_operating_point']}`):"),
        "",
        "| operating point | rule | threshold | val sensitivity | val FP / scan | val F1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, o in ops.items():
        lines.append(
            f"| {name} | {o['rule']} | {o['threshold']:.3f} | {o['val_sensitivity']:.3f} | "
            f"{o['val_fp_per_scan']:.2f} | {o['val_f1']:.3f} |"
        )
    if meta.get("test"):
        lines += _test_rows(meta["test"], ops)
    lines += [
        "",
        ("- Held-out synthetic patients (seeds no run used): `results/detect_held_out.md` "
         "(`benchmarks/detect_held_out.py`)."),
    ]
    return "\n".join(lines) + "\n"


def _test_rows(t: dict[str, Any], ops: dict[str, Any]) -> list[str]:
    """The card's table of the test split's VALDO lesion metrics per operating point."""
    intro = (f"VALDO-protocol lesion metrics on the test split ({t['patients']} patients, {t['cmbs']} CMBs, "
             f"{t['cmb_free']} CMB-free; whole scans, every head slice searched; centres matched "
             "one-to-one):")
    head = ("| operating point | sensitivity (3 mm) | FP / scan | FP / CMB-free scan | precision (3 mm) | "
            "median F1 (< 5 mm) | median F1 (< 3 mm) | abs count difference |")
    lines = ["", intro, "", head, "|---|---|---|---|---|---|---|---|"]
    for name in ops:
        m = {k: (float("nan") if v is None else v) for k, v in t[name].items()}
        lines.append(f"| {name} | {m['sensitivity_3mm']:.3f} | {m['fp_per_scan']:.2f} | "
                     f"{m['fp_per_cmb_free_scan']:.2f} | {m['precision_3mm']:.3f} | "
                     f"{m['median_f1_5mm']:.3f} | {m['median_f1_3mm']:.3f} | "
                     f"{m['abs_count_difference']:.2f} |")
    return lines


def install(folder: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write the second stage into an exported model folder (:func:`cmbfe.modelfolder.write_stage2`) and
    put :func:`card_section` into its model card (replacing an earlier one)."""
    from cmbfe import modelfolder
    from cmbfe.utils import atomic_write_text

    modelfolder.write_stage2(folder, state, meta)
    card_path = Path(folder) / modelfolder.CARD
    card = card_path.read_text() if card_path.is_file() else ""
    if CARD_HEADING in card:
        head, _, rest = card.partition(CARD_HEADING)
        nxt = rest.find("\n## ")
        card = head + (rest[nxt + 1 :] if nxt >= 0 else "")
    atomic_write_text(card_path, card.rstrip("\n") + "\n\n" + card_section(meta))


def main(argv: list[str] | None = None) -> int:
    """``python -m cmbfe.detect.stage2_fit MODEL --raw RAW --pre PRE [--seed S] [--epochs E]``: train the
    second stage of the exported model folder MODEL and write it there."""
    from cmbfe.detect.detector import load_detector
    from cmbfe.errors import ConfigError
    from cmbfe.runtime import apply_thread_env

    ap = argparse.ArgumentParser(prog="python -m cmbfe.detect.stage2_fit", description=main.__doc__)
    ap.add_argument("model", type=Path, help="exported model folder (gets stage2.pt and detect.json:stage2)")
    ap.add_argument("--raw", required=True, type=Path, help="synthetic cohort (RAW/<patient>/lesions.csv)")
    ap.add_argument("--pre", required=True, type=Path, help="preprocessed folder holding splits.csv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--cache", type=Path, default=None, help="folder for the detector's outputs per scan")
    args = ap.parse_args(argv)
    try:
        apply_thread_env()
        det = load_detector(args.model)
        state, meta = train_stage2(
            det,
            args.raw,
            args.pre,
            seed=args.seed,
            epochs=args.epochs,
            cache=args.cache,
            log=lambda s: print(s, flush=True),
        )
        install(args.model, state, meta)
    except (InputError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ops = meta["operating_points"]
    print("second stage written to", args.model, {k: v["threshold"] for k, v in ops.items()})
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
