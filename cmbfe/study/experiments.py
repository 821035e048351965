"""Training-heavy experiments of the study: cross-validation (06), backbones and timing (07), ablations (08).

Every run goes through :func:`cmbfe.study.runs.ensure_run` (cached by configuration hash) and is evaluated
with :func:`cmbfe.study.runs.evaluate_run`; tables put this run beside the paper, labelled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cmbfe import metrics as M
from cmbfe import stats
from cmbfe.config import Ablation, Config, FEArm, with_overrides
from cmbfe.data import training_dataset
from cmbfe.datadir import SPLITS, DataDir
from cmbfe.models import build_model
from cmbfe.runtime import device_description, resolve_device
from cmbfe.study import curves, paper, runs
from cmbfe.study.report import PAPER, RUN
from cmbfe.study.runs import evaluate_run
from cmbfe.train import build_optimizer, step_time


def _pooled_slices(pre: DataDir) -> tuple[dict[str, dict], dict[str, list], list]:
    """Every image of the PRE folder's splits by ``file_name``, their annotations by ``file_name``, and the
    categories."""
    ims: dict[str, dict] = {}
    anns: dict[str, list] = {}
    cats: list = []
    for split in SPLITS:
        coco = pre.coco(split)
        by_id = {im["id"]: im for im in coco["images"]}
        for im in coco["images"]:
            ims.setdefault(im["file_name"], im)
        for a in coco["annotations"]:
            anns.setdefault(by_id[a["image_id"]]["file_name"], []).append(a)
        cats = coco["categories"]
    return ims, anns, cats


def _fold_dirs(cfg: Config, pre: Path) -> list[Path]:
    """Write k patient-level folds as PRE folders (images and slice objects symlinked, COCO
    train/val/test) under ``cfg.data_path() / cv<k>``."""
    src = DataDir(pre)
    ims, anns, cats = _pooled_slices(src)
    patients = sorted({im["patient_id"] for im in ims.values()})
    rng = np.random.default_rng(cfg.eval.seed)
    order = [patients[i] for i in rng.permutation(len(patients))]
    k = min(cfg.study.folds, len(patients))
    fold_of = {p: i % k for i, p in enumerate(order)}
    dirs = []
    for f in range(k):
        d = DataDir(cfg.data_path() / f"cv{k}" / f"fold{f:02d}")
        d.annotations.mkdir(parents=True, exist_ok=True)
        for link, target in ((d.images, src.images), (d.slice_objects, src.slice_objects)):
            if not link.exists() and target.exists():
                os.symlink(os.path.relpath(target, d.root), link)
        test_pat = {p for p, i in fold_of.items() if i == f}
        val_pat = {p for p, i in fold_of.items() if i == (f + 1) % k} if k > 2 else set()
        for split, pats in (("test", test_pat), ("val", val_pat),
                            ("train", set(patients) - test_pat - val_pat)):
            sel = [im for fn, im in sorted(ims.items()) if im["patient_id"] in pats]
            if split != "train":  # CMB slices plus as many CMB-free (mimic) slices
                pos = [im for im in sel if im.get("has_cmb")]
                neg = [im for im in sel if not im.get("has_cmb")]
                pick = rng.permutation(len(neg))[:len(pos)] if neg else []
                sel = pos + [neg[i] for i in sorted(pick)]
            images, annotations = [], []
            for new_id, im in enumerate(sel, start=1):
                images.append({**im, "id": new_id})
                for a in anns.get(im["file_name"], []):
                    annotations.append({**a, "id": len(annotations) + 1, "image_id": new_id})
            d.write_split(split, {"images": images, "annotations": annotations, "categories": cats})
        dirs.append(d.root)
    return dirs


def cross_validate(cfg: Config, pre: Path) -> pd.DataFrame:
    """k-fold patient-level CV (``study.folds``), SSD vs SSD-FE, first seed, ``study.cv_iterations``.
    An empty frame when the profile runs no CV (``study.folds: 0``)."""
    its = cfg.study.cv_iterations or cfg.train.iterations
    rows: list[dict[str, Any]] = []
    if not cfg.study.folds:
        return pd.DataFrame(rows)
    for f, d in enumerate(_fold_dirs(cfg, pre)):
        row: dict[str, Any] = {"fold": f}
        for fe in (False, True):
            c = with_overrides(cfg, {"fe.enabled": fe, "train.iterations": its, "train.val_every": 0,
                                     **cfg.study.secondary})
            run = runs.ensure_run(c, data=d)
            r = evaluate_run(c, run, d, bootstrap=0)
            row[f"AP {'SSD-FE' if fe else 'SSD'}"] = r["metrics"]["ap_voc"]
            row["test patients"] = r["metrics"]["n_patients"]
            row["test CMBs"] = r["metrics"]["n_gt"]
        row["AP difference (FE - SSD)"] = row["AP SSD-FE"] - row["AP SSD"]
        rows.append(row)
    return pd.DataFrame(rows)


def cv_summary(cfg: Config, folds: pd.DataFrame) -> pd.DataFrame:
    """Mean AP over folds with its 95 % t-interval over folds (:func:`cmbfe.stats.combine_seeds`; folds as
    the replicates) and its spread (SD, min-max), beside the paper's 10-fold means."""
    rows = []
    ci_col = f"mean AP [95% t-interval over folds] {RUN}"
    for fe in (False, True):
        col = f"AP {'SSD-FE' if fe else 'SSD'}"
        v = folds[col].to_numpy()
        rows.append({"model": "SSD-FE" if fe else "SSD", "folds": len(v), f"mean AP {RUN}": v.mean(),
                     ci_col: _interval_text(stats.combine_seeds(v)),
                     f"SD over folds {RUN}": v.std(ddof=1) if len(v) > 1 else np.nan,
                     f"min-max {RUN}": f"{v.min():.3f}-{v.max():.3f}",
                     f"mean AP, 10 folds {PAPER}": paper.CV_MEAN_AP[fe]})
    d = folds["AP difference (FE - SSD)"].to_numpy()
    cs = stats.combine_seeds(d)
    rows.append({"model": "FE - SSD (paired by fold)", "folds": len(d), f"mean AP {RUN}": cs["mean"],
                 ci_col: _interval_text(cs, signed=True),
                 f"SD over folds {RUN}": d.std(ddof=1) if len(d) > 1 else np.nan,
                 f"min-max {RUN}": f"{d.min():.3f}-{d.max():.3f}",
                 f"mean AP, 10 folds {PAPER}": paper.CV_MEAN_AP[True] - paper.CV_MEAN_AP[False]})
    return pd.DataFrame(rows)


def _interval_text(cs: dict[str, float], signed: bool = False) -> str:
    """``mean [lo, hi]`` of a :func:`cmbfe.stats.combine_seeds` result (the mean alone without one)."""
    f = "{:+.3f}" if signed else "{:.3f}"
    if not np.isfinite(cs.get("lo", np.nan)):
        return f.format(cs["mean"])
    return f"{f.format(cs['mean'])} [{f.format(cs['lo'])}, {f.format(cs['hi'])}]"


def _paper_table3_key(backbone: str) -> str:
    base = {"mobilenet_v3": "mobilenet"}.get(backbone, backbone)
    return next((k for k in paper.TABLE3 if k.split(":")[0] == base), "")


def _step_times(cfg: Config, base: Config, pre: Path, device: torch.device) -> tuple[float, float]:
    """Median seconds of one training step without and with FE on one fixed batch of ``study.timing_batch``
    CMB slices of the training split (as training draws them, windows included, without augmentation), the
    two models sharing their initial weights; ``study.timing_repeats`` interleaved steps each."""
    ds = training_dataset(base, pre, augment=False, negatives=False)
    batch = [ds[(i % len(ds), i)] for i in range(cfg.study.timing_batch)]
    images = [b[0].to(device) for b in batch]
    targets = [{"boxes": b[1]["boxes"].to(device), "labels": b[1]["labels"].to(device)} for b in batch]
    torch.manual_seed(0)
    models, opts = {}, {}
    for fe in (False, True):
        c = with_overrides(base, {"fe.enabled": fe})
        models[fe] = build_model(c.model, c.fe).to(device)
        if fe:
            models[True].load_state_dict(models[False].state_dict())
        opts[fe] = build_optimizer(models[fe], c.train)[0]
    times: dict[bool, list[float]] = {False: [], True: []}
    amp = device.type == "cuda" and cfg.train.amp
    for rep in range(cfg.study.timing_repeats):
        for fe in (False, True):
            t = step_time(models[fe], images, targets, opts[fe], repeats=1, warmup=1 if rep == 0 else 0,
                          amp=amp)
            times[fe].append(t["median_s"])
    return float(np.median(times[False])), float(np.median(times[True]))


def _paper_table3_columns(backbone: str) -> dict[str, Any]:
    """The paper's Table 3 row of the nearest backbone (labelled), or nothing."""
    key = _paper_table3_key(backbone)
    if not key:
        return {}
    p = paper.TABLE3[key]
    return {f"paper model {PAPER}": key,
            f"precision@90% SSD / SSD-FE {PAPER}": f"{p['precision'][0]:.3f} / {p['precision'][1]:.3f}",
            f"s/batch of 8 SSD / SSD-FE {PAPER}": f"{p['s_per_batch'][0]:.3f} / {p['s_per_batch'][1]:.3f}",
            f"FE time ratio {PAPER}": round(p["s_per_batch"][1] / p["s_per_batch"][0], 3)}


def operating_point_columns(res: dict[str, Any], run: Path, arm: str, target: float = 0.9) -> dict[str, Any]:
    """Table 3 cells of one evaluated run (:func:`cmbfe.study.runs.evaluate_run`, the profile's hit rule):
    recall and precision at the highest score threshold reaching ``target`` recall (the paper's "precision at
    90 % recall"), AP, and whether the run passed the plateau criterion (:func:`cmbfe.study.curves.plateau`:
    val AP moving < 0.02 over the last 20 % of training). Recall and precision of a run that did not pass, or
    never reaches ``target``, are a sentence saying so, never a number."""
    p = curves.plateau(curves.val_curve(run))
    k = M.operating_point(res["curve"], target)
    if not p["at_plateau"]:
        moved = "fewer than 2 validations in the window" if p["window_range"] is None or p["checks"] < 2 \
            else f"val AP moved {p['window_range']:.3f} over the last 20 %"
        recall = precision = f"not converged ({moved})"
    elif k is None:
        recall = f"max {res['metrics']['sensitivity']:.3f} (< {target:.0%})"
        precision = f"n/a ({target:.0%} recall not reached)"
    else:
        recall = round(float(res["curve"].sensitivity[k]), 4)
        precision = round(float(res["curve"].precision[k]), 4)
    return {f"recall at the {target:.0%} point {arm} {RUN}": recall,
            f"precision at {target:.0%} recall {arm} {RUN}": precision,
            f"AP {arm} {RUN}": res["metrics"]["ap_voc"], f"converged {arm} {RUN}": bool(p["at_plateau"])}


def table3(cfg: Config, pre: Path) -> pd.DataFrame:
    """Table 3: per ``study.timing_backbones`` entry (``backbone:size``), recall and precision at the paper's
    operating point (90 % recall) without/with FE from runs that pass the plateau criterion
    (:func:`operating_point_columns`; trained ``study.timing_iterations`` with the profile's validation
    schedule; only with ``study.timing_precision``) and training seconds per batch of ``study.timing_batch``
    (:func:`_step_times`)."""
    its = cfg.study.timing_iterations or cfg.train.iterations
    device = resolve_device(cfg.train.device)
    dev = device_description()
    cpu = f"CPU {dev['cpu']} ({dev['torch_threads']} threads)"
    dev_name = dev.get("gpu") if device.type == "cuda" else cpu
    rows = []
    for spec in cfg.study.timing_backbones:
        backbone, size = spec.split(":")
        # the profile's validation schedule is kept: the plateau criterion needs the run's val curve
        base = with_overrides(cfg, {**cfg.study.secondary, "model.backbone": backbone,
                                    "model.size": int(size), "train.iterations": its})
        row: dict[str, Any] = {"backbone": backbone, "input": f"{size}x{size}"}
        for fe in (False, True) if cfg.study.timing_precision else ():
            c = with_overrides(base, {"fe.enabled": fe})
            run = runs.ensure_run(c)
            row |= operating_point_columns(evaluate_run(c, run, pre, bootstrap=0), run,
                                           "SSD-FE" if fe else "SSD")
        t0, t1 = _step_times(cfg, base, pre, device)
        row[f"s/batch of {cfg.study.timing_batch} SSD {RUN}"] = round(t0, 4)
        row[f"s/batch SSD-FE {RUN}"] = round(t1, 4)
        row[f"FE time ratio {RUN}"] = round(t1 / t0, 3)
        row["device (this run)"] = dev_name
        rows.append(row | _paper_table3_columns(backbone))
    return pd.DataFrame(rows)


# name (the values of config.Ablation) -> (reference label, reference overrides),
# (alternative label, alternative overrides)
ABLATIONS: dict[Ablation, list[tuple[str, dict[str, Any]]]] = {
    "placement": [("FE before L2Norm (R1, inline, paper-literal; default)",
                   {"fe.enabled": True, "fe.placement": "pre_l2norm"}),
                  ("FE after conv4_3 L2Norm (R2, the head sees FE)",
                   {"fe.enabled": True, "fe.placement": "post_l2norm"})],
    "schedule": [("FE, constant alpha (paper)", {"fe.enabled": True, "fe.schedule": "constant"}),
                 ("FE, cosine-decayed alpha", {"fe.enabled": True, "fe.schedule": "cosine"})],
    "variant": [("FE (multiplicative, paper)", {"fe.enabled": True, "fe.variant": "fe"}),
                ("Assisted Excitation (additive)", {"fe.enabled": True, "fe.variant": "ae"})],
    "priors": [("CMB-sized priors", {"fe.enabled": False, "model.priors": "cmb"}),
               ("standard SSD priors", {"fe.enabled": False, "model.priors": "paper"})],
    "input": [("gray3 (slice replicated, paper)", {"fe.enabled": False, "model.input": "gray3"}),
              ("2.5D (slices z-1, z, z+1)", {"fe.enabled": False, "model.input": "2.5d"})],
}


def ablations(cfg: Config, pre: Path) -> pd.DataFrame:
    """For each ``study.ablations`` entry: reference vs alternative, over ``study.ablation_seeds`` seeds,
    AP and precision at 90 % sensitivity (mean over seeds; patient-bootstrap CI of the first seed) and the
    paired-bootstrap difference alternative - reference (first seed) with its p-value."""
    its = cfg.study.ablation_iterations or cfg.train.iterations
    seeds = cfg.study.seeds[: max(1, cfg.study.ablation_seeds)]
    rows = []
    for name in cfg.study.ablations:  # each one of ABLATIONS (config.Ablation, checked at load)
        results = []
        for label, over in ABLATIONS[name]:
            res = []
            for s in seeds:
                c = with_overrides(cfg, {**cfg.study.secondary, "train.iterations": its, "train.seed": s,
                                         "train.val_every": 0, **over})
                res.append(evaluate_run(c, runs.ensure_run(c), pre))
            results.append((label, res))
        ref = results[0][1][0]
        for i, (label, res) in enumerate(results):
            aps = [r["metrics"]["ap_voc"] for r in res]
            precs = [r["metrics"]["precision_at_sensitivity_0.9"] for r in res]
            row = {"ablation": name, "setting": label, "seeds": len(res),
                   "AP (mean over seeds)": float(np.mean(aps)),
                   "AP seed-0 bootstrap 95% CI": f"[{res[0]['metrics']['bootstrap']['ap_voc']['lo']:.3f}, "
                                                 f"{res[0]['metrics']['bootstrap']['ap_voc']['hi']:.3f}]",
                   "precision@90% sens (mean)": float(np.mean(precs))}
            if i > 0:
                pb = stats.paired_bootstrap(res[0]["boot"], ref["boot"], n=cfg.eval.bootstrap,
                                            seed=cfg.eval.seed)
                d = pb["ap_voc"]
                row["AP diff vs reference [95% CI]"] = f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
                row["p (paired bootstrap)"] = d["p"]
            rows.append(row)
    return pd.DataFrame(rows)


def _fe_on(placement: str, variant: str, schedule: str) -> dict[str, Any]:
    return {"fe.enabled": True, "fe.placement": placement, "fe.variant": variant, "fe.schedule": schedule,
            "fe.sham": False, "fe.mask_loss_weight": 0.0}


MASK_LOSS_WEIGHT = 1.0  # the mask arm's BCE weight (fe.mask_loss_weight): the detection losses are O(1)

# The readings of the paper's FE (README, "Feature enhancement"), each an arm of the paired comparison; every
# arm sets every FE key it depends on, so a profile's ``fe`` section cannot leak into an arm
FE_ARMS: dict[FEArm, dict[str, Any]] = {
    "no FE": {"fe.enabled": False, "fe.sham": False, "fe.mask_loss_weight": 0.0},
    "R1": _fe_on("pre_l2norm", "fe", "constant"),
    "R2 constant": _fe_on("post_l2norm", "fe", "constant"),
    "R2 cosine": _fe_on("post_l2norm", "fe", "cosine"),
    "R3": _fe_on("pre_l2norm", "l2n", "constant"),
    "R4 cosine": _fe_on("pre_l2norm", "mean", "cosine"),
    "AE cosine": _fe_on("pre_l2norm", "ae", "cosine"),
    # the null: R1's alpha and per-box masks, moved off every GT box (cmbfe.fe.sham_shifts)
    "R1 sham": {**_fe_on("pre_l2norm", "fe", "constant"), "fe.sham": True},
    # the leak-free reuse of the ground truth: FE off, a 1x1 head on conv4_3 predicts M (BCE), dropped at test
    "mask loss": {"fe.enabled": False, "fe.sham": False, "fe.mask_loss_weight": MASK_LOSS_WEIGHT},
}


def holm(p: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of the p-values ``p`` (family-wise error over them; NaNs kept as NaN and
    not counted): sort ascending, ``p_(i) * (m - i)`` for ``i = 0..m-1``, running maximum, capped at 1."""
    v = np.asarray(p, dtype=float)
    out = np.full(v.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(v))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(v[ok], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate(v[order] * (m - np.arange(m))))
    out[order] = adj
    return out


def arm_seeds(cfg: Config, arms: list[str]) -> dict[str, tuple[int, ...]]:
    """The seeds each arm is trained with: the first ``study.fe_arm_seeds[arm]`` of ``study.seeds`` (all when
    not listed); ``no FE`` gets every seed any arm uses (at least its own count), so each arm has its
    same-seed no-FE pair."""
    seeds = tuple(cfg.study.seeds)
    out = {a: seeds[: cfg.study.fe_arm_seeds.get(a, len(seeds))] for a in arms}
    others = [len(v) for a, v in out.items() if a != "no FE"]
    out["no FE"] = seeds[: max(others + [cfg.study.fe_arm_seeds.get("no FE", 1)])]
    return out


def _per_seed(cfg: Config, arms: list[str], seeds: dict[str, tuple[int, ...]], res: dict) -> pd.DataFrame:
    rows = []
    for a in arms:
        for s in seeds[a]:
            r, base = res[(a, s)], res[("no FE", s)]
            row: dict[str, Any] = {"arm": a, "seed": s, f"AP {RUN}": r["metrics"]["ap_voc"]}
            if a != "no FE":
                d = stats.paired_bootstrap(r["boot"], base["boot"], n=cfg.eval.bootstrap, seed=cfg.eval.seed,
                                           ci=cfg.eval.ci)["ap_voc"]
                row |= {"AP - no FE": d["diff"],
                        "95% CI (paired patient bootstrap)": f"[{d['lo']:+.3f}, {d['hi']:+.3f}]", "p": d["p"]}
            rows.append(row)
    return pd.DataFrame(rows)


P_ARM = "p (t over seeds; 1 seed: paired bootstrap)"
P_HOLM = "p Holm over arms"


def readings_summary(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per arm (from :func:`fe_readings`' per-seed frame): seeds, mean AP, mean AP - no FE with a t-interval
    over seeds and its p (:data:`P_ARM`: one-sample two-sided t-test of the per-seed paired differences
    against 0; an arm with one seed: that seed's paired-bootstrap p), the Holm-adjusted p over the arms other
    than no FE (:data:`P_HOLM`, :func:`holm`), the no-FE seed SD and the paper's +0.023 beside R1."""
    from scipy.stats import ttest_1samp

    ap = f"AP {RUN}"
    base = per_seed.loc[per_seed["arm"] == "no FE", ap].to_numpy()
    base_sd = float(np.std(base, ddof=1)) if len(base) > 1 else np.nan
    rows = []
    for a in dict.fromkeys(per_seed["arm"]):
        sub = per_seed[per_seed["arm"] == a]
        row: dict[str, Any] = {"arm": a, "seeds": len(sub), f"mean AP {RUN}": float(sub[ap].mean())}
        if a != "no FE":
            d = sub["AP - no FE"].to_numpy(dtype=float)
            cs = stats.combine_seeds(d)
            ci = f"[{cs['lo']:+.3f}, {cs['hi']:+.3f}]" if np.isfinite(cs["lo"]) else ""
            if len(d) > 1:
                p = float(ttest_1samp(d, 0.0).pvalue) if np.std(d) > 0 else np.nan
            else:
                p = float(sub["p"].iloc[0])
            row |= {f"mean AP - no FE {RUN}": cs["mean"], "95% t-interval over seeds": ci, P_ARM: p}
        row[f"no-FE seed SD {RUN}"] = base_sd
        row[f"SSD-FE - SSD {PAPER}"] = paper.TABLE2_FE_GAIN if a == "R1" else np.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    if P_ARM in out:
        out.insert(out.columns.get_loc(P_ARM) + 1, P_HOLM, holm(out[P_ARM].to_numpy(dtype=float)))
    return out


def fe_readings(cfg: Config, pre: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every arm of ``study.fe_arms`` trained with its seeds (:func:`arm_seeds`; same data order and
    augmentation per seed: the arms differ only in FE), evaluated on the test split.

    Returns ``(per_seed, summary)``: per arm and seed the AP and, against the no-FE run of the same seed,
    the paired patient-bootstrap difference with its CI and p; per arm :func:`readings_summary`. Runs are
    cached per configuration (:func:`cmbfe.study.runs.ensure_run`), so an interrupted profile resumes where
    it stopped. Empty frames when the profile lists no arms."""
    arms = list(cfg.study.fe_arms)
    if not arms:
        return pd.DataFrame(), pd.DataFrame()
    if "no FE" not in arms:
        arms = ["no FE", *arms]
    seeds = arm_seeds(cfg, arms)
    res = {(a, s): evaluate_run(c, runs.ensure_run(c), pre)
           for a in arms for s in seeds[a]
           for c in [with_overrides(cfg, {**FE_ARMS[a], "train.seed": s})]}
    per_seed = _per_seed(cfg, arms, seeds, res)
    return per_seed, readings_summary(per_seed)


def fe_readings_figure(per_seed: pd.DataFrame) -> Any:
    """AP - no FE per arm: one dot per seed with its paired-bootstrap CI, the paper's +0.023 as a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    arms = [a for a in dict.fromkeys(per_seed["arm"]) if a != "no FE"]
    for i, a in enumerate(arms):
        sub = per_seed[per_seed["arm"] == a].reset_index(drop=True)
        for j, r in sub.iterrows():
            lo, hi = (float(v) for v in r["95% CI (paired patient bootstrap)"].strip("[]").split(","))
            x = i + (j - (len(sub) - 1) / 2) * 0.12
            ax.errorbar(x, r["AP - no FE"], yerr=[[r["AP - no FE"] - lo], [hi - r["AP - no FE"]]], fmt="o",
                        ms=4, capsize=2, color=f"C{j}", label=f"seed {r['seed']}" if i == 0 else None)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.axhline(paper.TABLE2_FE_GAIN, color="C3", ls="--", lw=0.8,
               label=f"paper SSD-512 +{paper.TABLE2_FE_GAIN:.3f}")
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("AP - no FE (paired)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
