"""Writing an exported model folder (:mod:`cmbfe.modelfolder`) from a training run and its evaluated
validation and test splits: the operating threshold chosen on validation
(:func:`~cmbfe.detect.lesion_metrics.lesion_threshold`), test metrics with patient-bootstrap CIs, the
``detect.json`` facts and the model card.

The splits come in already evaluated (ground truth and the run's detections on them): choosing which run to
ship and predicting on its splits is the study's job (:mod:`cmbfe.study.ship`); this module never calls it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cmbfe import config as C
from cmbfe import metrics as M
from cmbfe import modelfolder
from cmbfe.datadir import DataDir
from cmbfe.detect.lesion_metrics import lesion_threshold, per_patient, with_ci
from cmbfe.errors import InputError

Split = tuple[M.GroundTruth, M.Detections]  # a split's ground truth and a run's detections on it


def _fmt(d: dict[str, Any] | None, fmt: str = "{:.3f}") -> str:
    if not d or d.get("estimate") is None or not np.isfinite(d["estimate"]):
        return "n/a"
    if d.get("lo") is None or not np.isfinite(d["lo"]):
        return fmt.format(d["estimate"])
    return f"{fmt.format(d['estimate'])} [{fmt.format(d['lo'])}, {fmt.format(d['hi'])}]"


# Long card lines continue with a backslash so the card keeps its lines while the source stays <= 110 columns.
CARD = """# cmbfe shipped CMB detector: `{name}`

> **Research use only: trained on synthetic data, not validated on real patients.** Trained and tested on
> cmbfe's simulated SWI cohort only; not a medical device. Use `cmbfe detect` to study the method, \
never for care.

Written by `make reproduce` (`cmbfe.detect.export.export_model`, {created}); `cmbfe detect` reads this folder
(`model.pt` weights, `config.yaml` the training configuration, `detect.json` threshold and metrics).

## Model
- {architecture}; {params:,} parameters, `model.pt` {mb:.1f} MB (sha256 `{sha}`).
- Source run: `{source_run}` ({selection}).
- Feature enhancement in training: {fe}. At test time the network is the plain SSD.

## Training data
- Synthetic cohort (`cmbfe synth`, profile `{profile}`): {patients} patients (seed {synth_seed}),
  {matrix} x {matrix} px over {fov:g} mm ({px:.3g} mm pixels), {slice_mm:g} mm slices, {field:g} T, \
TE {te:g} ms,
  CMBs: mean {cmb_mean:g} per CMB-bearing patient ({p_no_cmb:.0%} CMB-free), true radius {r0:g}-{r1:g} mm, \
dchi
  {c0:g}-{c1:g} ppm, {p_lobar:.0%} lobar; mimics: ~{veins} veins, calcifications, deep-nuclei iron, air; \
SNR {s0:g}-{s1:g}.
- Split by patient: {splits}. Training: {iterations} iterations x batch {batch}, Adam lr {lr:g}, seed {seed},
  augmentation {augment}.

## Operating threshold: {threshold:.4g}
- Chosen on the validation split: {threshold_text}.
- `cmbfe detect --threshold T` overrides it.

## Metrics on the synthetic test split ({test_patients} patients, {test_cmbs} 3D CMBs)
95 % percentile bootstrap over test patients ({boot} resamples). False positives are counted on the split's
slices (every CMB slice plus as many mimic-only slices), not whole scans; `cmbfe detect` searches every
head slice, so expect more per scan (notebook `09_detect` counts them on a held-out patient).

| metric | value |
|---|---|
| lesion sensitivity at the threshold | {sens} |
| false-positive 3D detections per scan at the threshold | {fps} |
| slice AP, IoU >= 0.5 (VOC all-point; the paper's metric) | {ap_iou} |
| slice AP, centre distance <= {radius:g} mm | {ap_centre} |

## Input expectations
- One 3D SWI or T2*-weighted GRE **magnitude** volume per patient (DICOM series or NIfTI), CMBs dark.
  Other orientations are reoriented to axial slices (axis permutation only, no interpolation).
- In-plane pixels are resampled to the training pixel ({px:.3g} mm) when they differ by > 2 %; slices \
are used
  as acquired (training: {slice_mm:g} mm). Whole head, not skull-stripped (as in training).
- Preprocessing as in training: head mask, N4 ({n4_iter}, shrink {n4_shrink}), intensities clipped at the
  {clip} percentiles inside the head mask, 8 bit.

## Limitations
- Synthetic training data: real scanners, sequences, artefacts and pathology differ; expect lower \
sensitivity
  and more false positives on real scans. Mimics (veins, calcifications, iron, air) cause most false \
positives.
- Sizes are box extents of the detector (blooming included), not haemosiderin volumes.
"""


def _card(meta: dict[str, Any], cfg: C.Config) -> str:
    """The model card (:data:`CARD` filled from ``detect.json``'s facts and the run's config)."""
    s, t = cfg.synth, cfg.train
    tm, rule = meta["test_metrics"], meta["threshold_rule"]
    td = meta["training_data"]
    splits = (" / ".join(f"{k} {v}" for k, v in td["splits"].items()) + " patients" if td["splits"]
              else "see PRE")
    return CARD.format(
        name=meta["name"], created=meta["created"][:10], architecture=meta["architecture"],
        params=meta["parameters"], mb=meta["weights_bytes"] / 1e6, sha=meta["weights_sha256"][:16],
        source_run=meta["source_run"], selection=meta["selection"]["text"],
        fe="yes (SSD-FE)" if cfg.fe.enabled else "no", profile=meta["profile"], patients=s.patients,
        synth_seed=s.seed, matrix=td["matrix"], fov=s.fov_mm, px=td["pixel_spacing_mm"][1],
        slice_mm=td["slice_mm"], field=s.field_t, te=s.te_ms, cmb_mean=s.cmb_mean, p_no_cmb=s.p_no_cmb,
        r0=s.cmb_radius_mm[0], r1=s.cmb_radius_mm[1], c0=s.cmb_dchi_ppm[0], c1=s.cmb_dchi_ppm[1],
        p_lobar=s.p_lobar, veins=s.veins, s0=s.snr[0], s1=s.snr[1], splits=splits,
        iterations=t.iterations, batch=t.batch_size, lr=t.lr, seed=t.seed,
        augment="on (flips, intensity, blur, affine)" if cfg.augment.enabled else "off",
        threshold=meta["threshold"], threshold_text=rule["text"], test_patients=tm["n_patients"],
        test_cmbs=tm["n_cmbs"], boot=tm["bootstrap"], sens=_fmt(tm["lesion_sensitivity"]),
        fps=_fmt(tm["fp_per_scan"], "{:.2f}"), ap_iou=_fmt(tm["ap_iou"]), ap_centre=_fmt(tm["ap_centre"]),
        radius=rule.get("radius_mm") or 2.5, n4_iter=list(cfg.preprocess.n4_iterations),
        n4_shrink=cfg.preprocess.n4_shrink, clip=list(cfg.preprocess.clip_percentiles))


def test_metrics(gt: M.GroundTruth, dets: M.Detections, threshold: float, *, rule: str = "centre",
                 radius_mm: float = 2.5, iou: float = 0.5, bootstrap: int = 1000, seed: int = 0,
                 ci: float = 0.95) -> dict[str, Any]:
    """Lesion sensitivity and FP 3D detections per scan at ``threshold``
    (:func:`~cmbfe.detect.lesion_metrics.with_ci`) and slice AP under IoU and centre matching (VOC
    all-point), each with ``ci`` percentile intervals over ``bootstrap`` patient resamples."""
    from cmbfe import evaluate as E

    m = M.match(gt, dets, rule=rule, iou=iou, radius_mm=radius_mm)
    tm = with_ci(per_patient(gt, dets, m, threshold), bootstrap, seed, ci)
    for key, how in (("ap_iou", "iou"), ("ap_centre", "centre")):
        r = E.evaluate(gt, dets, match=how, iou=iou, radius_mm=radius_mm, bootstrap=bootstrap, seed=seed,
                       ci=ci)["metrics"]
        b = r["bootstrap"]["ap_voc"]
        tm[key] = {"estimate": r["ap_voc"], "lo": b["lo"], "hi": b["hi"]}
    return tm


def _training_data(pre: DataDir, cfg: C.Config) -> dict[str, Any]:
    """``detect.json``'s ``training_data``: the training slices' geometry (as ``train.json`` records it), the
    split sizes (``preprocess.json``; {} when unreadable) and the synthetic cohort's settings."""
    im = pre.coco("train")["images"][0]
    try:
        splits = pre.manifest_dict()["summary"]["splits"]
    except (InputError, KeyError, TypeError):
        splits = {}
    return {"source": "synthetic (cmbfe synth)", "pixel_spacing_mm": im["pixel_spacing_mm"],
            "matrix": int(max(im["width"], im["height"])), "slice_mm": im.get("slice_mm"), "splits": splits,
            "synth": cfg.to_dict()["synth"]}


def export_model(run_dir: str | Path, out_dir: str | Path, *, val: Split, test: Split, pre: str | Path,
                 name: str = "default", selection: dict[str, Any] | None = None, target: float = 0.9,
                 rule: str = "centre", radius_mm: float = 2.5, bootstrap: int = 1000, seed: int = 0) -> Path:
    """Export ``run_dir`` (``config.yaml`` + ``model.pt``) to ``out_dir`` (replaced atomically) with its
    threshold (chosen on ``val`` by :func:`~cmbfe.detect.lesion_metrics.lesion_threshold`), ``test`` metrics
    (:func:`test_metrics`) and card. ``pre`` is the run's PRE folder (training geometry, split sizes);
    ``val``/``test`` are the PRE folder's splits with the run's detections on them.
    """
    run = Path(run_dir).resolve()
    mf = modelfolder.load(run)  # checks that the weights load and match
    cfg = mf.cfg
    rule_info = lesion_threshold(*val, target=target, rule=rule, radius_mm=radius_mm, iou=cfg.eval.iou)
    thr = rule_info["threshold"]
    tm = test_metrics(*test, thr, rule=rule, radius_mm=radius_mm, iou=cfg.eval.iou, bootstrap=bootstrap,
                      seed=seed, ci=cfg.eval.ci)
    td = _training_data(DataDir(Path(pre).resolve()), cfg)
    weights = (run / modelfolder.WEIGHTS).read_bytes()
    rel = run.relative_to(C.REPO_ROOT) if run.is_relative_to(C.REPO_ROOT) else run
    mcfg = cfg.model
    meta: dict[str, Any] = {
        "format": modelfolder.FORMAT, "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": cfg.profile, "source_run": str(rel), "config_hash": cfg.hash(),
        "architecture": f"SSD-{mcfg.size} on {mcfg.backbone}{'-BN' if mcfg.batch_norm else ''} at "
                        f"{mcfg.width:g} channel width, {mcfg.priors} priors, input {mcfg.input}",
        "parameters": int(sum(p.numel() for p in mf.model.parameters())),
        "weights_sha256": hashlib.sha256(weights).hexdigest(), "weights_bytes": len(weights),
        "selection": selection or {"text": "exported directly"},
        "threshold": thr, "threshold_rule": rule_info, "test_metrics": tm, "training_data": td,
    }
    meta["card_summary"] = [
        (f"trained on synthetic SWI ({cfg.synth.patients} patients, {td['matrix']} px at "
         f"{td['pixel_spacing_mm'][1]:.3g} mm); not validated on real patients"),
        (f"synthetic test split: lesion sensitivity {_fmt(tm['lesion_sensitivity'])}, "
         f"{_fmt(tm['fp_per_scan'], '{:.2f}')} FP 3D detections/scan at the threshold; slice AP (IoU 0.5) "
         f"{_fmt(tm['ap_iou'])}")]
    return modelfolder.write(out_dir, weights=run / modelfolder.WEIGHTS, config=run / modelfolder.CONFIG,
                             meta=meta, card=_card(meta, cfg))
