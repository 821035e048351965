"""Plots for the evaluation (matplotlib, Agg backend): PR and FROC curves of several runs with bootstrap
bands, image tiles with GT (green) and detection (red) boxes (paper Figs. 6/7).

Figures are made with pyplot (so ``plt.show()`` displays them in notebooks; close them with
``plt.close(fig)`` in loops). Outside a Jupyter kernel and without ``MPLBACKEND`` the backend is set to
Agg on import (headless, no GUI). Files are written deterministically (no dates or software strings in
the metadata) and atomically: :func:`save_figure` writes ``STEM.png`` and ``STEM.pdf``. Boxes are ``xyxy``
in continuous pixel coordinates of the full slice (pixel ``(j, i)`` covers ``[i, i+1) x [j, j+1)``).

A run passed to :func:`plot_pr`/:func:`plot_froc` is a :class:`cmbfe.metrics.Curve`, a mapping
``{"curve": Curve, "bands": ...}``, or a mapping with arrays (``recall``, ``precision`` /
``fp_per_scan``, ``sensitivity``); bands (key ``bands`` or ``band``) are the dict returned by
:func:`cmbfe.stats.bootstrap_bands`.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

if "ipykernel" not in sys.modules and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cmbfe.augment import build_augment
from cmbfe.data import SliceDataset, read_png
from cmbfe.datadir import SPLITS, DataDir
from cmbfe.metrics import FROC_FPS, Curve
from cmbfe.utils import atomic_write_bytes

GT_COLOR = "#00e000"
DET_COLOR = "#ff2020"
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None}}


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``stem.<fmt>`` for each format, byte-for-byte reproducible; returns the paths."""
    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata=_METADATA.get(fmt))
        path = Path(f"{stem}.{fmt}")
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def _unpack(run: Curve | Mapping[str, Any]) -> tuple[Curve | Mapping[str, Any], Mapping | None]:
    """(curve or array mapping, bands or None) of one run."""
    if isinstance(run, Curve):
        return run, None
    band = run.get("bands", run.get("band"))
    return run.get("curve", run), band


def _pr_arrays(run: Curve | Mapping[str, Any], interpolated: bool) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(run, Curve):
        r, p = run.sensitivity, run.precision_interp if interpolated else run.precision
    else:
        r, p = np.asarray(run["recall"], float), np.asarray(run["precision"], float)
        if interpolated and len(p):
            p = np.maximum.accumulate(p[::-1])[::-1]
    return r, p


def _froc_arrays(run: Curve | Mapping[str, Any], per: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(run, Curve):
        x = run.fp_per_scan if per == "scan" else run.fp_per_slice
        return np.concatenate([[0.0], x]), np.concatenate([[0.0], run.sensitivity])
    return np.asarray(run[f"fp_per_{per}"], float), np.asarray(run["sensitivity"], float)


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Figure, Any]:
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def plot_pr(runs: Mapping[str, Curve | Mapping[str, Any]], out: str | Path | None = None, ax: Any = None,
            interpolated: bool = True, title: str | None = None,
            figsize: tuple[float, float] = (4.5, 4.0)) -> Figure:
    """Sensitivity (recall) - precision curves, one line per run label, bootstrap bands shaded.

    With ``interpolated`` the VOC envelope (max precision at recall >= r) is drawn as a step function.
    ``out`` is a file stem (``.png`` and ``.pdf`` are written).
    """
    fig, ax = _axes(ax, figsize)
    for i, (label, run) in enumerate(runs.items()):
        color = f"C{i}"
        run, band = _unpack(run)
        r, p = _pr_arrays(run, interpolated)
        if len(r):
            ax.plot(np.concatenate([[0.0], r]), np.concatenate([[p[0]], p]), color=color, label=label,
                    drawstyle="steps-pre" if interpolated else "default", lw=1.5)
        if band is not None:
            ax.fill_between(band["recall"], band["precision_lo"], band["precision_hi"], color=color,
                            alpha=0.2, lw=0, step="pre" if interpolated else None)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="sensitivity (recall)", ylabel="precision")
    ax.axvline(0.9, color="0.6", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize="small")
    if title:
        ax.set_title(title)
    if out is not None:
        save_figure(fig, out)
    return fig


def plot_froc(runs: Mapping[str, Curve | Mapping[str, Any]], out: str | Path | None = None, ax: Any = None,
              per: str = "scan", title: str | None = None, xlim: tuple[float, float] = (1 / 8, 8),
              figsize: tuple[float, float] = (4.5, 4.0)) -> Figure:
    """FROC: sensitivity vs FP per scan (patient) or per slice, log2 x axis, step curves, bands shaded.

    ``per="scan"`` marks the FROC levels 1/8 .. 8 FP/scan. ``out`` is a file stem (png + pdf).
    """
    fig, ax = _axes(ax, figsize)
    for i, (label, run) in enumerate(runs.items()):
        color = f"C{i}"
        run, band = _unpack(run)
        x, s = _froc_arrays(run, per)
        if len(x):
            x = np.concatenate([x, [max(x[-1], xlim[1]) * 2]])
            s = np.concatenate([s, s[-1:]])
            ax.plot(np.maximum(x, xlim[0] / 4), s, color=color, label=label, drawstyle="steps-post", lw=1.5)
        if band is not None and per == "scan":
            ax.fill_between(band["fp_per_scan"], band["sensitivity_lo"], band["sensitivity_hi"], color=color,
                            alpha=0.2, lw=0, step="post")
    ax.set_xscale("log", base=2)
    ax.set(xlim=xlim, ylim=(0, 1.02), xlabel=f"false positives per {per}", ylabel="sensitivity")
    if per == "scan":
        ax.set_xticks(FROC_FPS, [f"{f:g}" if f >= 1 else f"1/{round(1 / f)}" for f in FROC_FPS])
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    if out is not None:
        save_figure(fig, out)
    return fig


def crop_around(box: Sequence[float], size: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer xyxy crop of ``size`` x ``size`` px centred on ``box``, shifted to stay inside ``shape``
    ``(height, width)`` (smaller if the image is)."""
    h, w = shape[:2]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    sw, sh = min(size, w), min(size, h)
    x0 = int(np.clip(round(cx - sw / 2), 0, w - sw))
    y0 = int(np.clip(round(cy - sh / 2), 0, h - sh))
    return x0, y0, x0 + sw, y0 + sh


def image_tiles(images: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], det_boxes: Sequence[np.ndarray],
                det_scores: Sequence[np.ndarray] | None = None, titles: Sequence[str] | None = None,
                crops: Sequence[Sequence[int] | None] | None = None, ncols: int = 4,
                tile_inches: float = 2.0, out: str | Path | None = None,
                vmin: float | None = None, vmax: float | None = None) -> Figure:
    """Grid of image tiles with GT boxes (green) and detections (red, score printed if given).

    ``images[k]``: 2D (gray) or HxWx3 array; ``gt_boxes[k]``/``det_boxes[k]``: (n, 4) xyxy in full-image
    pixels; ``crops[k]``: optional integer xyxy region to show (see :func:`crop_around`). ``out`` is a
    file stem (png + pdf).
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(tile_inches * ncols, tile_inches * nrows * 1.08))
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k >= n:
            continue
        img = np.asarray(images[k])
        h, w = img.shape[:2]
        crop = crops[k] if crops is not None and crops[k] is not None else (0, 0, w, h)
        x0, y0, x1, y1 = (int(v) for v in crop)
        ax.imshow(img[y0:y1, x0:x1], cmap="gray", extent=(x0, x1, y1, y0), interpolation="nearest",
                  vmin=vmin, vmax=vmax)
        lw = max(0.8, 1.5 * tile_inches / 2)
        for b in np.asarray(gt_boxes[k], float).reshape(-1, 4):
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec=GT_COLOR, lw=lw))
        dets = np.asarray(det_boxes[k], float).reshape(-1, 4)
        scores = None if det_scores is None else np.asarray(det_scores[k], float).reshape(-1)
        for j, b in enumerate(dets):
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec=DET_COLOR, lw=lw,
                                   ls="--"))
            if scores is not None:
                ax.text(b[0], b[3] + 0.5, f"{scores[j]:.2f}", color=DET_COLOR, fontsize=6, va="top",
                        clip_on=True)  # under the box (y grows downwards)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        if titles is not None:
            ax.set_title(titles[k], fontsize=7)
    fig.subplots_adjust(wspace=0.04, hspace=0.15, left=0.01, right=0.99, top=0.95, bottom=0.01)
    if out is not None:
        save_figure(fig, out)
    return fig



OBJECT_COLORS = {"cmb": "#ff2020", "vein": "#2080ff", "calcification": "#ff9900", "iron": "#ffe000",
                 "air": "#ff00ff"}


def data_examples(pre: str | Path, n: int = 3, crop: int | None = None) -> Figure:
    """``n`` slices with the most CMBs (one per patient), CMB boxes red and mimic boxes coloured by kind
    (:data:`OBJECT_COLORS`), from a preprocessed folder (``slice_objects.csv`` + ``images/``)."""
    pre = DataDir(pre)
    objs = pd.read_csv(pre.slice_objects)
    cmb = objs[objs["kind"] == "cmb"].groupby(["patient_id", "slice_index"]).size().sort_values(
        ascending=False, kind="stable").reset_index()
    picks = cmb.drop_duplicates("patient_id").head(n)
    names = {}
    for split in SPLITS:
        for im in pre.coco(split)["images"]:
            names[(im["patient_id"], int(im["slice_index"]))] = im["file_name"]
    fig, axes = plt.subplots(1, max(1, len(picks)), figsize=(4 * max(1, len(picks)), 4.3), squeeze=False)
    for ax, (_, row) in zip(axes[0], picks.iterrows()):
        pid, z = row["patient_id"], int(row["slice_index"])
        fn = names.get((pid, z), f"{pid}/z{z:04d}.png")
        img = read_png(pre.image_path(fn))
        ax.imshow(img, cmap="gray", interpolation="nearest")
        sel = objs[(objs["patient_id"] == pid) & (objs["slice_index"] == z)]
        for _, o in sel.iterrows():
            col = OBJECT_COLORS.get(o["kind"], "#ffffff")
            pad = 2.0
            ax.add_patch(Rectangle((o["x0"] - pad, o["y0"] - pad), o["x1"] - o["x0"] + 2 * pad,
                                   o["y1"] - o["y0"] + 2 * pad, fill=False, ec=col,
                                   lw=1.2 if o["kind"] == "cmb" else 0.7))
        ax.set_title(f"{pid}, slice {z}: {int((sel['kind'] == 'cmb').sum())} CMB boxes", fontsize=9)
        ax.set_axis_off()
    handles = [Rectangle((0, 0), 1, 1, fill=False, ec=c, label=k) for k, c in OBJECT_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.07, wspace=0.03)
    return fig


def augment_examples(pre: str | Path, augment_cfg: Any, n: int = 4, seed: int = 0) -> Figure:
    """One training slice with CMBs and ``n`` augmented draws of it (boxes green), seeded."""
    ds = SliceDataset(pre, "train", negatives_ratio=0)
    counts = [len(ds.target(i)["boxes"]) for i in range(len(ds))]
    idx = int(np.argmax(counts))
    image, target = ds[idx]
    aug = build_augment(augment_cfg)
    imgs, boxes, titles = [image[1].numpy()], [target["boxes"].numpy()], ["original"]
    for k in range(n):
        im, bx = aug(image, target["boxes"], seed=seed * 1000 + k)
        imgs.append(im[1].numpy())
        boxes.append(bx.numpy())
        titles.append(f"draw {k + 1}: {len(bx)} boxes")
    return image_tiles(imgs, boxes, [np.zeros((0, 4))] * len(imgs), titles=titles, ncols=min(5, n + 1),
                       tile_inches=3.0, vmin=0.0, vmax=1.0)


def fe_figure(maps: Mapping[str, Any]) -> Figure:
    """Paper Fig. 3, for students: per example the image with its GT boxes, the FE mask M at the first
    detection source, that source's features before and after FE (mean over channels, one shared grey scale)
    and their difference after - before on a diverging colormap centred on zero (white: no change; red: FE
    raised the feature, blue: lowered it). The difference scale is symmetric, ``+-max|diff|``, but never
    narrower than 1e-3 of the features' range, so float noise (R1: the L2Norm cancels FE at the head) stays
    white. ``maps`` from ``report.fe_examples``."""
    from matplotlib.colors import TwoSlopeNorm

    img, before, after, mask = maps["image"], maps["before"], maps["after"], maps["mask"]
    n = img.shape[0]
    fig, axes = plt.subplots(n, 5, figsize=(14, 3 * n), squeeze=False)
    titles = maps.get("titles") or [""] * n
    for k in range(n):
        b, a = before[k].mean(axis=0), after[k].mean(axis=0)
        diff = a - b
        lo, hi = float(min(b.min(), a.min())), float(max(b.max(), a.max()))
        lim = max(float(np.abs(diff).max()), 1e-3 * max(hi - lo, 1e-12))
        a0, a1, a2, a3, a4 = axes[k]
        a0.imshow(img[k, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for bx in np.asarray(maps["boxes"][k]).reshape(-1, 4):
            a0.add_patch(Rectangle((bx[0], bx[1]), bx[2] - bx[0], bx[3] - bx[1], fill=False, ec=GT_COLOR,
                                   lw=1))
        im1 = a1.imshow(mask[k, 0], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        a2.imshow(b, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        im3 = a3.imshow(a, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        im4 = a4.imshow(diff, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim), interpolation="nearest")
        a0.set_title(f"{titles[k]} with GT box", fontsize=8)
        a1.set_title("FE mask M (first source)", fontsize=8)
        a2.set_title(f"features before FE (mean of {before.shape[1]} ch)", fontsize=8)
        a3.set_title("features after FE", fontsize=8)
        a4.set_title(f"after - before (0 = white; max |diff| {np.abs(diff).max():.2g})", fontsize=8)
        for ax, im in ((a1, im1), (a3, im3), (a4, im4)):
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        for ax in axes[k]:
            ax.set_axis_off()
    fig.tight_layout()
    return fig


def fe_explorer(maps: Mapping[str, Any]) -> Any:
    """JupyterLab explorer (ipywidgets): sliders over the example and the channel (-1 = channel mean)
    showing input features, enhanced features and their difference. Headless it returns the widget."""
    import ipywidgets as widgets

    before, after = maps["before"], maps["after"]

    def show(example: int = 0, channel: int = -1) -> None:
        b = before[example].mean(0) if channel < 0 else before[example, channel]
        a = after[example].mean(0) if channel < 0 else after[example, channel]
        _fig, axs = plt.subplots(1, 3, figsize=(9, 3))
        lim = max(float(np.abs(a - b).max()), 1e-12)
        for ax, arr, t in zip(axs, (b, a, a - b), ("input", "enhanced", "difference (0 = white)")):
            diverging = {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim} if t.startswith("diff") else {}
            ax.imshow(arr, **({"cmap": "magma"} | diverging), interpolation="nearest")
            ax.set_title(t, fontsize=9)
            ax.set_axis_off()
        plt.show()

    return widgets.interactive(show, example=(0, before.shape[0] - 1), channel=(-1, before.shape[1] - 1))
