"""The per-scan report of ``cmbfe detect``: ``report.pdf`` (matplotlib ``PdfPages``) and a self-contained
``report.html`` (the same pages as base64 PNGs, the lesion table as HTML, the model card as text).

Pages: a summary (the burden: CMB count and its bin, :func:`burden_bin`; the operating point or threshold and
where it comes from, the model and its card's key facts, time per stage, a projection of all lesion centres
on axial and coronal mean-intensity projections, the lesion table), then an axial crop (thumbnail) around
each lesion (:func:`lesion_pages`, 30 per page), then axial tiles of every slice with a kept detection
(box, lesion id and score), 20 per page.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from cmbfe.detect.detector import Detector
from cmbfe.detect.pipeline import ScanResult

RESEARCH_ONLY = "Research use only: trained on synthetic data, not validated on real patients."
A4 = (8.27, 11.69)
TILES = (4, 5)  # columns, rows per page
BOX = "#ff3030"
PNG_DPI = 100
LABELS = 8  # score labels per tile (the highest scores; every kept box is drawn)
CROP_PX = 96  # tiles show at least this many pixels around the slice's detections
THUMB = (6, 5)  # lesion thumbnails: columns, rows per page
THUMB_MM = 30.0  # side of a lesion thumbnail
BINS = ((0, 0, "0"), (1, 4, "1-4"), (5, 9, "5-9"), (10, None, ">= 10"))


def burden_bin(n: int) -> str:
    """The CMB count's bin: ``0``, ``1-4``, ``5-9`` or ``>= 10`` (the MARS / ARIA-H convention)."""
    for lo, hi, name in BINS:
        if n >= lo and (hi is None or n <= hi):
            return name
    raise ValueError(f"CMB count must be >= 0, got {n}")


def _lines(res: ScanResult, det: Detector, summary: dict[str, Any]) -> list[str]:
    c = summary["counts"]
    nz, ny, nx = res.vol.shape
    dz, dy, dx = res.vol.spacing_mm
    src = {"model": "stored with the model", "--threshold": "set with --threshold",
           "fallback": "fallback: the model stores none"}[det.threshold_source]
    rule = det.meta.get("threshold_rule") or {}
    out = [f"Burden: {c['cmbs']} CMB(s), bin {burden_bin(c['cmbs'])} (bins 0, 1-4, 5-9, >= 10)",
           (f"Scan: {res.scan.name} ({res.scan.kind}, {nx} x {ny} x {nz} voxels, "
            f"{dx:.3g} x {dy:.3g} x {dz:.3g} mm)"),
           (f"CMBs detected: {c['cmbs']} (on {c['slices_with_cmb']} slices; {c['slice_detections_kept']} "
            f"slice detections kept of {c['slice_detections_all']}; {c['slices_inferred']} of "
            f"{c['slices_total']} slices inside the head searched)")]
    st = summary.get("second_stage")
    if st:
        out.append(f"Operating point: {st['operating_point']} ({st['rule']}): second-stage probability >= "
                   f"{st['threshold']:.3g} on {st['candidates']} candidates (detector score >= "
                   f"{st['candidate_threshold']:g}); {st['kept']} kept")
    else:
        out.append(f"Threshold: {res.threshold:.4g} ({src}; detector alone, no second stage)")
        if rule.get("text"):
            out.append(f"  {rule['text']}")
    out.append(f"Model: {det.name}: {summary['model']['architecture']}"
               + (", trained with FE" if det.cfg.fe.enabled else ""))
    out += [f"  {s}" for s in det.meta.get("card_summary", [])]
    info = summary["preprocessing"]
    if info.get("resampled_to_px"):
        out.append(f"In-plane resampled to {info['resampled_to_px'][1]} x {info['resampled_to_px'][0]} px "
                   f"(the model's {det.pixel_spacing_mm[1]:.3g} mm training pixel) for the network")
    if summary.get("warning"):
        out.append(f"WARNING: {summary['warning']}")
    t = summary["timings_s"]
    out.append("Time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k != "total"))
    return out


def _projection_axes(fig: Figure, rect: tuple[float, float, float, float], res: ScanResult) -> None:
    """Axial and coronal mean-intensity projections (head slices) with every lesion centre numbered."""
    u8 = res.u8.astype(np.float32)
    nz, ny, nx = u8.shape
    dz, dy, dx = res.vol.spacing_mm
    x, y, w, h = rect
    ax_w = w * 0.5
    a1 = fig.add_axes((x, y, ax_w - 0.01, h))
    a2 = fig.add_axes((x + ax_w + 0.01, y, ax_w - 0.01, h))
    axial = u8.mean(axis=0)
    coronal = u8.mean(axis=1)  # [k, i]
    a1.imshow(axial, cmap="gray", extent=(0, nx * dx, ny * dy, 0), interpolation="bilinear")
    a2.imshow(coronal, cmap="gray", extent=(0, nx * dx, 0, nz * dz), origin="lower", interpolation="bilinear")
    for les in res.lesions:
        ci, cj, ck = les["centre_vox"]
        for ax, px, py in ((a1, (ci + 0.5) * dx, (cj + 0.5) * dy), (a2, (ci + 0.5) * dx, (ck + 0.5) * dz)):
            ax.plot(px, py, "o", ms=7, mfc="none", mec=BOX, mew=1.2)
            ax.text(px + 4, py, str(les["lesion_id"]), color=BOX, fontsize=6, va="center", clip_on=True)
    a1.set_title("axial projection (mean), lesion centres", fontsize=8)
    a2.set_title("coronal projection (mean; superior up)", fontsize=8)
    for ax in (a1, a2):
        ax.set_axis_off()


def summary_page(res: ScanResult, det: Detector, summary: dict[str, Any]) -> Figure:
    """Page 1: facts, the projection of lesion centres and (up to 30 rows of) the lesion table."""
    fig = Figure(figsize=A4)
    fig.text(0.05, 0.965, "cmbfe detect: cerebral microbleed report", fontsize=15, weight="bold")
    fig.text(0.05, 0.945, RESEARCH_ONLY, fontsize=8.5, color="#b00000")
    y = 0.922
    for line in _lines(res, det, summary):
        indent = line.startswith("  ")
        for part in textwrap.wrap(line, 118 if indent else 130, subsequent_indent="    " if indent else "  "):
            fig.text(0.05, y, part, fontsize=7.5 if not indent else 6.8,
                     family="monospace" if indent else None)
            y -= 0.0155
    top = min(y - 0.01, 0.80)
    _projection_axes(fig, (0.05, top - 0.36, 0.9, 0.36), res)
    tab = res.table
    y = top - 0.39
    cols = ["lesion_id", "i", "j", "k", "x_ras_mm", "y_ras_mm", "z_ras_mm", "slice_first", "slice_last",
            "diameter_mm", "max_score"]
    head = ["id", "i", "j", "k", "x RAS", "y RAS", "z RAS", "first", "last", "diam mm", "score"]
    fig.text(0.05, y, "  ".join(f"{h:>8}" for h in head), fontsize=6.5, family="monospace", weight="bold")
    for _, row in tab.head(30).iterrows():
        y -= 0.0125
        fig.text(0.05, y, "  ".join(f"{row[c]:>8g}" for c in cols), fontsize=6.5, family="monospace")
    if len(tab) > 30:
        fig.text(0.05, y - 0.0125, f"... {len(tab) - 30} more in cmbs.csv", fontsize=6.5)
    if not len(tab):
        fig.text(0.05, y - 0.0125, "no CMB detected at this operating point", fontsize=8)
    return fig


def _crop(boxes: np.ndarray, shape: tuple[int, int], min_side: int = CROP_PX,
          pad: int = 16) -> tuple[int, ...]:
    """Integer xyxy crop (square, >= ``min_side`` px, within ``shape`` (rows, cols)) around ``boxes``'
    union."""
    ny, nx = shape
    u0, v0 = boxes[:, :2].min(axis=0)
    u1, v1 = boxes[:, 2:].max(axis=0)
    side = int(min(max(min_side, u1 - u0 + 2 * pad, v1 - v0 + 2 * pad), nx, ny))
    cx, cy = (u0 + u1) / 2, (v0 + v1) / 2
    x0 = int(np.clip(round(cx - side / 2), 0, nx - side))
    y0 = int(np.clip(round(cy - side / 2), 0, ny - side))
    return x0, y0, x0 + side, y0 + side


def tile_pages(res: ScanResult) -> list[Figure]:
    """Axial tiles of every slice with a kept detection: the 8-bit slice the network saw, boxes, id, score."""
    kept = res.lesion_of > 0
    ks = [int(k) for k in np.unique(res.slices[kept])]
    per = TILES[0] * TILES[1]
    pages = []
    _dz, dy, dx = res.vol.spacing_mm
    for p in range(0, len(ks), per):
        fig = Figure(figsize=A4)
        fig.text(0.05, 0.97, f"{res.scan.name}: slices with a detection ({p + 1}-{min(p + per, len(ks))} of "
                             f"{len(ks)}), cropped around them; red: box, #lesion id, score", fontsize=9)
        for n, k in enumerate(ks[p:p + per]):
            c, r = n % TILES[0], n // TILES[0]
            ax = fig.add_axes((0.02 + c * 0.24, 0.96 - (r + 1) * 0.19, 0.23, 0.175))
            sel = np.flatnonzero(kept & (res.slices == k))
            sel = sel[np.argsort(-res.scores[sel], kind="stable")]
            x0, y0, x1, y1 = _crop(res.boxes[sel], res.u8.shape[1:])
            ax.imshow(res.u8[k, y0:y1, x0:x1], cmap="gray", vmin=0, vmax=255, interpolation="nearest",
                      aspect=dy / dx, extent=(x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5))
            b = res.boxes[sel] - 0.5  # pixel centres at integers in imshow
            segs = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]], b[:, [0, 1]]], axis=1)
            ax.add_collection(LineCollection(segs, colors=BOX, linewidths=0.8))
            for d in sel[:LABELS]:
                _, by0, bx1, _ = res.boxes[d]
                ax.text(bx1 + 0.5, by0 - 0.5, f"#{res.lesion_of[d]} {res.scores[d]:.2f}", color=BOX,
                        fontsize=5.5, clip_on=True)
            if len(sel) > LABELS:
                ax.text(x0 + 1, y1 - 3, f"{len(sel)} boxes; {LABELS} highest labelled", color=BOX, fontsize=5)
            ax.set_title(f"slice {k}: cols {x0}-{x1 - 1}, rows {y0}-{y1 - 1}", fontsize=6, pad=2)
            ax.set_axis_off()
        pages.append(fig)
    return pages


def lesion_pages(res: ScanResult) -> list[Figure]:
    """An axial crop (:data:`THUMB_MM` square) of the 8-bit volume around each lesion's centre, on its
    centre slice, with a circle of the lesion's diameter; lesion id, score (second stage when present)."""
    per = THUMB[0] * THUMB[1]
    _dz, dy, dx = res.vol.spacing_mm
    nz, ny, nx = res.u8.shape
    hy, hx = round(THUMB_MM / 2 / dy), round(THUMB_MM / 2 / dx)
    pages = []
    for p in range(0, len(res.lesions), per):
        fig = Figure(figsize=A4)
        fig.text(0.05, 0.97, f"{res.scan.name}: each CMB ({p + 1}-{min(p + per, len(res.lesions))} of "
                             f"{len(res.lesions)}), axial {THUMB_MM:g} mm crops on its centre slice",
                 fontsize=9)
        for n, les in enumerate(res.lesions[p:p + per]):
            c, r = n % THUMB[0], n // THUMB[0]
            ax = fig.add_axes((0.03 + c * 0.16, 0.95 - (r + 1) * 0.185, 0.15, 0.165))
            ci, cj, ck = les["centre_vox"]
            k, j, i = int(np.clip(round(ck), 0, nz - 1)), round(cj), round(ci)
            tile = np.zeros((2 * hy + 1, 2 * hx + 1), np.uint8)
            ys, xs = slice(max(j - hy, 0), min(j + hy + 1, ny)), slice(max(i - hx, 0), min(i + hx + 1, nx))
            oy, ox = ys.start - (j - hy), xs.start - (i - hx)
            tile[oy:oy + ys.stop - ys.start, ox:ox + xs.stop - xs.start] = res.u8[k, ys, xs]
            ax.imshow(tile, cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect=dy / dx)
            rad = max(les["diameter_mm"] / 2 / dx, 1.5) + 1.5
            ax.add_patch(Circle(
                (ci - i + hx, cj - j + hy), rad, fill=False, ec=BOX, lw=0.8))
            score = les.get("stage2_score")
            ax.set_title(f"#{les['lesion_id']} slice {k} " + (f"p {score:.2f}" if score is not None
                                                                else f"score {les['max_score']:.2f}"),
                         fontsize=6, pad=2)
            ax.set_axis_off()
        pages.append(fig)
    return pages


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _html(res: ScanResult, det: Detector, summary: dict[str, Any], pngs: list[str]) -> str:
    e = html.escape
    lines = "".join(f"<li>{e(s.strip())}</li>" for s in _lines(res, det, summary))
    table = (res.table.to_html(index=False, border=0, classes="cmbs") if len(res.table)
             else "<p>No CMB detected.</p>")
    imgs = "".join(f'<img alt="report page {n + 1}" src="data:image/png;base64,{p}">'
                   for n, p in enumerate(pngs))
    card = f"<details><summary>Model card</summary><pre>{e(det.card)}</pre></details>" if det.card else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cmbfe detect: {e(res.scan.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em}}
.warn{{color:#b00000;font-weight:bold}} table.cmbs{{border-collapse:collapse;font-size:0.85em}}
table.cmbs td,table.cmbs th{{padding:0.15em 0.6em;text-align:right;border-bottom:1px solid #ddd}}
img{{max-width:100%;border:1px solid #ccc;margin:0.5em 0}} pre{{white-space:pre-wrap;font-size:0.8em}}</style>
</head><body>
<h1>cmbfe detect: cerebral microbleed report</h1>
<p class="warn">{e(RESEARCH_ONLY)}</p>
<ul>{lines}</ul>
<h2>Lesions (cmbs.csv)</h2>
{table}
{card}
<h2>Pages</h2>
{imgs}
</body></html>
"""


def render_report(res: ScanResult, det: Detector, out: Path, summary: dict[str, Any]) -> list[Path]:
    """Write ``report.pdf`` and ``report.html`` for one scan into ``out``."""
    from matplotlib.backends.backend_pdf import PdfPages

    figs = [summary_page(res, det, summary), *lesion_pages(res), *tile_pages(res)]
    pdf = Path(out) / "report.pdf"
    meta = {"Title": f"cmbfe detect: {res.scan.name}", "Creator": "cmbfe detect", "Subject": "CMB report"}
    with PdfPages(pdf, metadata=meta) as pp:
        for f in figs:
            pp.savefig(f)
    pngs = [_png(f) for f in figs]
    page = Path(out) / "report.html"
    page.write_text(_html(res, det, summary, pngs), encoding="utf-8")
    return [pdf, page]


def html_pages(path: str | Path) -> list[bytes]:
    """The page PNGs embedded in a ``report.html`` (summary first), for display in a notebook."""
    import re

    text = Path(path).read_text(encoding="utf-8")
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]
