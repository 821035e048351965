"""Why an FE reading helps or hurts: the train/test mismatch it creates, measured on trained runs.

Diagnostics (issues #10, #19), for runs trained with ``fe.enabled``:

- **loss gap over training** (``RUN/fe_gap.csv``, written by :mod:`cmbfe.train` at every validation): the
  training losses on one fixed batch of CMB slices with FE on (what training optimises) and off (what the
  network meets at test time). A gap that persists means the heads lean on the training-only FE.
- **head input inside vs outside the boxes** (:func:`head_input_norms`): the per-position L2 norm and the
  cosine between the conv4_3 head input with FE (training) and without (test), inside the GT boxes (mask > 0)
  and outside, taken in a training forward (training windows at the training input side, not a window
  upsampled to the whole-slice side as an eval-mode call would), and the relative change of every source map.
  R1/R3 are cancelled by the L2Norm (ratio 1, cosine 1); R2 scales the head input inside the boxes by
  (1 + alpha M); R4/AE turn its direction. :func:`positives_on_first_map`: the share of positive default
  boxes on that head (where R1 cancels).
- **Figs 6/7 and their null** (:func:`difference_null`): the false positives FE "removes" and the CMBs it
  "finds" against the same counts between two SSD runs that differ only in their seed.
- **box side at test**: the predicted / GT side ratio where the centre rule finds the CMB
  (:func:`cmbfe.study.report.box_scale_table`): heads calibrated to an enhanced input shrink their boxes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cmbfe.config import Config, load
from cmbfe.data import training_dataset
from cmbfe.fe import enhancement_mask
from cmbfe.fe_gap import FE_GAP_BATCH, fe_gap, fe_gap_batch
from cmbfe.modelfolder import load_model


def fixed_batch(cfg: Config, pre: Path, n: int = FE_GAP_BATCH) -> list[tuple[torch.Tensor, dict]]:
    """The fixed batch :mod:`cmbfe.train` logs ``fe_gap.csv`` on (:func:`cmbfe.fe_gap.fe_gap_batch`),
    rebuilt from a run's configuration (:func:`cmbfe.data.training_dataset`, as training builds it)."""
    return fe_gap_batch(training_dataset(cfg, pre), n)


@torch.no_grad()
def training_sources(model: Any, batch: list[tuple[torch.Tensor, dict]]) -> dict[str, Any]:
    """The backbone's source maps in a training forward of a copy of ``model`` on ``batch`` (train mode: the
    training transform's input side, ``train_crop`` for windows, and batch statistics; ``model`` and its
    BatchNorm buffers untouched), with FE off (``test``: what inference meets) and on (``train``, at the
    model's current alpha; the sham arm's moved masks), and the true FE mask at the first source.

    Returns ``{"test": [maps], "train": [maps], "mask": [B,1,h,w], "side": input side px}``."""
    m = copy.deepcopy(model).train()
    images = [im for im, _ in batch]
    targets = [t for _, t in batch]
    seen: dict[str, Any] = {}

    def keep(mod: Any, inp: Any, out: Any) -> None:
        seen["maps"], seen["inp"] = [v.detach() for v in out.values()], inp[0]

    hook = m.backbone.register_forward_hook(keep)
    try:
        out: dict[str, Any] = {}
        for tag, on in (("test", False), ("train", True)):
            m.fe.enabled = on
            m(images, targets)
            out[tag] = seen["maps"]
    finally:
        hook.remove()
    mean, std = m._centre_norm()
    p = (seen["inp"][:, 1:2].float() * std + mean).clamp(min=0)
    out["mask"] = enhancement_mask(p, m._fe_boxes(images, targets), tuple(out["test"][0].shape[-2:]),
                                   m.fe.beta)
    out["side"] = int(seen["inp"].shape[-1])
    return out


@torch.no_grad()
def positives_on_first_map(model: Any, batch: list[tuple[torch.Tensor, dict]]) -> float:
    """Fraction of the positive (matched) default boxes of ``batch`` that sit on the first source map (the
    conv4_3 head, where the L2Norm cancels R1), matched as training matches them (train-mode transform and
    the detector's ``proposal_matcher`` on IoU)."""
    from torchvision.ops import box_iou

    m = copy.deepcopy(model).train()
    images, targets = m.transform([im for im, _ in batch], [dict(t) for _, t in batch])
    feats = list(m.backbone(images.tensors).values())
    anchors = m.anchor_generator(images, feats)
    per_loc = m.anchor_generator.num_anchors_per_location()
    first = feats[0].shape[-2] * feats[0].shape[-1] * per_loc[0]  # anchors are ordered map by map
    pos = on_first = 0
    for t, a in zip(targets, anchors):
        if len(t["boxes"]):
            matched = m.proposal_matcher(box_iou(t["boxes"], a)) >= 0
            pos += int(matched.sum())
            on_first += int(matched[:first].sum())
    return on_first / pos if pos else float("nan")


def head_input_norms(model: Any, batch: list[tuple[torch.Tensor, dict]]) -> dict[str, float]:
    """Training-time diagnostics (:func:`training_sources`): mean per-position L2 norm of the first head input
    without FE (test) and with FE (training), inside the GT boxes (true FE mask > 0) and outside, their
    ratios, the mean cosine between the two feature vectors inside the boxes, the input side the figures
    were taken at, and per source map the relative change ``||train - test|| / ||test||`` (the chain: what
    FE leaves at the conv4_3 head, what reaches the deeper maps)."""
    src = training_sources(model, batch)
    before, after, inside = src["test"][0], src["train"][0], src["mask"][:, 0] > 0
    nb, na = before.norm(dim=1), after.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(before, after, dim=1)
    out: dict[str, float] = {"input side (px)": float(src["side"])}
    for name, sel in (("inside", inside), ("outside", ~inside)):
        if sel.any():
            out[f"norm {name}, test"] = float(nb[sel].mean())
            out[f"norm {name}, train (FE)"] = float(na[sel].mean())
            out[f"train/test norm {name}"] = float((na[sel] / nb[sel].clamp(min=1e-12)).mean())
    out["cosine inside (train vs test)"] = float(cos[inside].mean()) if inside.any() else np.nan
    for k, (t, a) in enumerate(zip(src["test"], src["train"])):
        out[f"relative change, source {k}"] = float((a - t).norm() / t.norm().clamp(min=1e-12))
    return out


def mechanism_table(cfg: Config, runs: dict[str, Path], pre: Path) -> pd.DataFrame:
    """One row per FE run (``{label: run_dir}``; runs without FE are skipped): the head-input diagnostics at
    the alpha of the last training iteration, and the last fixed-batch losses with FE on / off."""
    rows = []
    for label, run in runs.items():
        rc = load(Path(run) / "config.yaml")
        if not rc.fe.enabled:
            continue
        model = load_model(run)
        its = rc.train.iterations
        model.fe.set_progress((its - 1) / its)
        batch = fixed_batch(rc, pre)
        row: dict[str, Any] = {"run": label, "reading": f"{rc.fe.variant}/{rc.fe.placement}/{rc.fe.schedule}",
                               "alpha at the end": float(model.fe.strength)}
        row |= head_input_norms(model, batch)
        row["positives on the first map"] = positives_on_first_map(model, batch)
        gap = fe_gap(model, batch, torch.device("cpu"))
        row |= {"loss FE on (end)": gap["loss_fe_on"], "loss FE off (end)": gap["loss_fe_off"]}
        rows.append(row)
    return pd.DataFrame(rows)


def plot_fe_gap(runs: dict[str, Path]) -> Any:
    """Fixed-batch training loss with FE on (solid) and off (dashed) over training, per FE run that logged
    ``fe_gap.csv``; ``None`` when none did."""
    import matplotlib.pyplot as plt

    logged = {k: Path(r) / "fe_gap.csv" for k, r in runs.items() if (Path(r) / "fe_gap.csv").is_file()}
    if not logged:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for i, (label, path) in enumerate(logged.items()):
        g = pd.read_csv(path)
        ax.plot(g["iteration"], g["loss_fe_on"], color=f"C{i}", label=f"{label}: FE on")
        ax.plot(g["iteration"], g["loss_fe_off"], color=f"C{i}", ls="--", label=f"{label}: FE off")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss on a fixed batch")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _threshold(metrics: dict) -> float:
    t = metrics.get("threshold_at_sensitivity_0.9")
    return float(t) if t is not None else 0.0


def difference_sets(a: dict, b: dict) -> tuple[list[tuple[int, np.ndarray, float]], list[int]]:
    """What Figs 6 and 7 show for runs ``a`` (reference) and ``b`` (evaluated on the same test split; the
    :func:`cmbfe.study.runs.evaluate_run` dicts), each at its own 90 %-sensitivity threshold:
    ``a``'s false positives with no ``b`` detection overlapping them (IoU > 0.1) on the same image, as
    ``(image row, box, score)`` by descending score (Fig. 6: "removed by b"), and the GT rows hit by a true
    positive of ``b`` but by none of ``a`` (Fig. 7: "found only by b"), smallest box first."""
    from cmbfe import metrics as M

    gt = a["gt"]
    keep = {}
    for key, r in (("a", a), ("b", b)):
        d, m = r["dets"], r["matching"]
        sel = d.scores >= _threshold(r["metrics"])
        keep[key] = (d.image[sel], d.boxes[sel], m.tp[sel], d.scores[sel])
    img_a, box_a, tp_a, sc_a = keep["a"]
    img_b, box_b, tp_b, _ = keep["b"]
    removed = []
    for i in np.argsort(-sc_a, kind="stable"):
        if tp_a[i]:
            continue
        same = img_b == img_a[i]
        if same.any() and (M.iou_pairs(box_a[i:i + 1].repeat(same.sum(), 0), box_b[same]) > 0.1).any():
            continue
        removed.append((int(img_a[i]), box_a[i], float(sc_a[i])))

    def hit_gt(img: np.ndarray, box: np.ndarray, tp: np.ndarray) -> set[int]:
        hits = set()
        for im, bx in zip(img[tp], box[tp]):
            on = np.flatnonzero(gt.box_image == im)
            if len(on):
                hits.add(int(on[np.argmax(M.iou_pairs(np.repeat(bx[None], len(on), 0), gt.boxes[on]))]))
        return hits

    found = sorted(hit_gt(img_b, box_b, tp_b) - hit_gt(img_a, box_a, tp_a),
                   key=lambda j: float(np.prod(gt.boxes[j, 2:] - gt.boxes[j, :2])))
    return removed, found


def difference_null(cfg: Config, ev: dict) -> pd.DataFrame:
    """Figs 6/7 with their null: how many false positives "removed" and CMBs "found only" appear between SSD
    and SSD-FE of the same seed, and between two SSD (no-FE) runs that differ only in their seed.

    ``ev``: ``{(size, fe, seed): evaluate_run result}`` of the main grid (05). Rows per pair at the largest
    size: ``comparison`` (``FE vs SSD`` or ``null: SSD vs SSD``), ``pair``, ``FP removed`` and
    ``CMBs found only``; a count FE shows is a finding only where it stands above the null rows."""
    size = max(cfg.study.sizes)
    seeds = [s for s in cfg.study.seeds if (size, False, s) in ev]
    rows = []
    for s in seeds:
        if (size, True, s) in ev:
            removed, found = difference_sets(ev[(size, False, s)], ev[(size, True, s)])
            rows.append({"comparison": "FE vs SSD", "pair": f"SSD-FE seed {s} vs SSD seed {s}",
                         "FP removed": len(removed), "CMBs found only": len(found)})
    for i, s in enumerate(seeds):
        for t in seeds[i + 1:]:
            removed, found = difference_sets(ev[(size, False, s)], ev[(size, False, t)])
            rows.append({"comparison": "null: SSD vs SSD", "pair": f"SSD seed {t} vs SSD seed {s}",
                         "FP removed": len(removed), "CMBs found only": len(found)})
    return pd.DataFrame(rows, columns=["comparison", "pair", "FP removed", "CMBs found only"])


def plot_difference_null(table: pd.DataFrame) -> Any:
    """Figs 6/7's counts beside their null (:func:`difference_null`): one dot per pair, FE vs SSD and
    SSD vs SSD (two seeds), for false positives removed and CMBs found only."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6.5, 3), sharey=False)
    groups = ["FE vs SSD", "null: SSD vs SSD"]
    for ax, col, title in zip(axes, ("FP removed", "CMBs found only"),
                              ("Fig. 6: FPs removed", "Fig. 7: CMBs found only")):
        for g, name in enumerate(groups):
            v = table.loc[table["comparison"] == name, col].to_numpy(dtype=float)
            ax.scatter(np.full(len(v), g) + np.linspace(-0.08, 0.08, len(v)) if len(v) > 1 else [g] * len(v),
                       v, color=f"C{g}", zorder=3)
            if len(v):
                ax.hlines(v.mean(), g - 0.2, g + 0.2, color=f"C{g}")
        ax.set_xticks(range(len(groups)), ["SSD-FE vs SSD\n(same seed)", "SSD vs SSD\n(two seeds)"],
                      fontsize=8)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("count on the test split")
    fig.tight_layout()
    return fig
