"""Learning curves and the plateau criterion: is a trained model's validation AP still moving?

A run validates every ``train.val_every`` iterations (``RUN/val.csv``: iteration, ap_voc, ...; see
:mod:`cmbfe.train`). A run is **at a plateau** when, over the last ``window`` fraction of its training
(default the last 20 %), its validation AP (IoU 0.5, VOC all-point) moves by less than ``tol`` (default
0.02 absolute): ``max - min`` of the checks in that window, the check at the window's start included.
A run with fewer than two checks in the window cannot show a plateau (reported as not at one).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

PLATEAU_WINDOW = 0.2
PLATEAU_TOL = 0.02


def val_curve(run_dir: Path | str) -> pd.DataFrame:
    """``RUN/val.csv`` as a frame with ``iteration``, ``fraction`` (of ``train.iterations``) and ``ap_voc``;
    empty when the run never validated."""
    run = Path(run_dir)
    path = run / "val.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["iteration", "fraction", "ap_voc"])
    val = pd.read_csv(path)
    its = _iterations(run, int(val["iteration"].max()) if len(val) else 1)
    val["fraction"] = val["iteration"] / its
    return val


def _iterations(run: Path, fallback: int) -> int:
    import yaml

    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        return int((yaml.safe_load(cfg_path.read_text()) or {}).get("train", {}).get("iterations", fallback))
    return fallback


def plateau(curve: pd.DataFrame, window: float = PLATEAU_WINDOW, tol: float = PLATEAU_TOL) -> dict[str, Any]:
    """Plateau criterion of one curve (see module docstring): ``final_ap``, ``window_start_ap``,
    ``window_range`` (max - min over the window), ``change`` (final - window start), ``checks`` in the
    window and ``at_plateau``."""
    tail = curve[curve["fraction"] >= 1.0 - window - 1e-9]
    if len(curve) == 0:
        return {"final_ap": None, "window_start_ap": None, "window_range": None, "change": None,
                "checks": 0, "at_plateau": False}
    ap = tail["ap_voc"].astype(float)
    rng = float(ap.max() - ap.min()) if len(ap) else None
    return {"final_ap": float(curve["ap_voc"].iloc[-1]),
            "window_start_ap": float(ap.iloc[0]) if len(ap) else None,
            "window_range": rng, "change": float(ap.iloc[-1] - ap.iloc[0]) if len(ap) else None,
            "checks": len(ap), "at_plateau": bool(len(ap) >= 2 and rng is not None and rng < tol)}


def plateau_table(runs: Mapping[str, Path | str], window: float = PLATEAU_WINDOW,
                  tol: float = PLATEAU_TOL) -> pd.DataFrame:
    """One row per run (``{label: run_dir}``): the plateau criterion of its validation curve."""
    rows = [{"run": label, **plateau(val_curve(run), window, tol)} for label, run in runs.items()]
    df = pd.DataFrame(rows)
    return df.rename(columns={"final_ap": "val AP (end)", "window_start_ap": f"val AP at {1 - window:.0%}",
                              "window_range": f"max-min over last {window:.0%}",
                              "change": f"change over last {window:.0%}", "checks": "checks in window",
                              "at_plateau": f"plateau (< {tol})"})


def plot_learning_curves(runs: Mapping[str, Path | str], ax: Any = None, title: str = "") -> Any:
    """Val AP against the fraction of training for every run (one line each), the plateau window shaded."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, run in runs.items():
        c = val_curve(run)
        if len(c):
            ax.plot(c["fraction"], c["ap_voc"], marker="o", ms=3, label=label)
    ax.axvspan(1 - PLATEAU_WINDOW, 1.0, color="0.9", zorder=0,
               label=f"plateau window (last {PLATEAU_WINDOW:.0%})")
    ax.set_xlabel("fraction of training")
    ax.set_ylabel("val AP (IoU 0.5, all-point)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return ax.figure
