"""Why an FE reading helps or hurts: the train/test mismatch it creates, measured on trained runs.

Three diagnostics (issue #10), for runs trained with ``fe.enabled``:

- **loss gap over training** (``RUN/fe_gap.csv``, written by :mod:`cmbfe.train` at every validation): the
  training losses on one fixed batch of CMB slices with FE on (what training optimises) and off (what the
  network meets at test time). A gap that persists means the heads lean on the training-only FE.
- **head input inside vs outside the boxes** (:func:`head_input_norms`): the per-position L2 norm and the
  cosine between the conv4_3 head input with FE (training) and without (test), inside the GT boxes (mask > 0)
  and outside. R1/R3 are cancelled by the L2Norm (ratio 1, cosine 1); R2 scales the head input inside the
  boxes by (1 + alpha M); R4/AE turn its direction.
- **box side at test**: the predicted / GT side ratio where the centre rule finds the CMB
  (:func:`cmbfe.study.report.box_scale_table`): heads calibrated to an enhanced input shrink their boxes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cmbfe.config import Config, load
from cmbfe.data import training_dataset
from cmbfe.fe_gap import FE_GAP_BATCH, fe_gap, fe_gap_batch
from cmbfe.modelfolder import load_model


def fixed_batch(cfg: Config, pre: Path, n: int = FE_GAP_BATCH) -> list[tuple[torch.Tensor, dict]]:
    """The fixed batch :mod:`cmbfe.train` logs ``fe_gap.csv`` on (:func:`cmbfe.fe_gap.fe_gap_batch`),
    rebuilt from a run's configuration (:func:`cmbfe.data.training_dataset`, as training builds it)."""
    return fe_gap_batch(training_dataset(cfg, pre), n)


@torch.no_grad()
def head_input_norms(model: Any, batch: list[tuple[torch.Tensor, dict]]) -> dict[str, float]:
    """Mean per-position L2 norm of the first head input without FE (test) and with FE (training, at the
    model's current alpha), inside the GT boxes (FE mask > 0) and outside, their ratios, and the mean cosine
    between the two feature vectors inside the boxes."""
    images = [im for im, _ in batch]
    targets = [t for _, t in batch]
    maps = model.fe_maps(images, targets)
    before, after, inside = maps["before"], maps["after"], maps["mask"][:, 0] > 0
    nb, na = before.norm(dim=1), after.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(before, after, dim=1)
    out: dict[str, float] = {}
    for name, sel in (("inside", inside), ("outside", ~inside)):
        if sel.any():
            out[f"norm {name}, test"] = float(nb[sel].mean())
            out[f"norm {name}, train (FE)"] = float(na[sel].mean())
            out[f"train/test norm {name}"] = float((na[sel] / nb[sel].clamp(min=1e-12)).mean())
    out["cosine inside (train vs test)"] = float(cos[inside].mean()) if inside.any() else np.nan
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
