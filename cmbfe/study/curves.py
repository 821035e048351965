"""Learning curves, the plateau criterion and the convergence rule: is a trained model's validation AP still
moving, and did the run train at all?

A run validates every ``train.val_every`` iterations (``RUN/val.csv``: iteration, ap_voc, ...; see
:mod:`cmbfe.train`). With ``train.val_subset`` the in-loop checks score a fixed subset of the val slices
(column ``subset`` 1) and the end has the subset's row and the whole split's (``subset`` 0): the curve is then
the subset's rows (one slice set throughout, the end included) and the run's final val AP the whole split's.

A run is **at a plateau** when, over the last ``window`` fraction of its training (default the last 20 %),
its validation AP (IoU 0.5, VOC all-point) moves by less than ``tol`` (default 0.02 absolute): ``max - min``
of the checks in that window, the check at the window's start included. A run with fewer than two checks in
the window cannot show a plateau (reported as not at one).

A plateau alone passes a dead run (a run stuck at a low AP while the LR is held low is flat too). A run has
**converged** (:func:`convergence_table`) when it is at a plateau **and** its final val AP is within ``gap``
(default 0.05) of the best final val AP among the seeds of its arm (the runs of one model/FE configuration).
A run that fails is reported, never dropped. The rule cannot reject an arm whose every seed died, nor a single
run alone in its arm: there it is the plateau criterion.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

PLATEAU_WINDOW = 0.2
PLATEAU_TOL = 0.02
CONVERGENCE_GAP = 0.05


def val_curve(run_dir: Path | str) -> pd.DataFrame:
    """``RUN/val.csv`` as a frame with ``iteration``, ``fraction`` (of ``train.iterations``), ``ap_voc`` and
    ``subset`` (0 where the file has no such column: a run from before ``train.val_subset``); empty when the
    run never validated."""
    run = Path(run_dir)
    path = run / "val.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["iteration", "fraction", "ap_voc", "subset"])
    val = pd.read_csv(path)
    its = _iterations(run, int(val["iteration"].max()) if len(val) else 1)
    val["fraction"] = val["iteration"] / its
    val["subset"] = val["subset"].fillna(0).astype(int) if "subset" in val else 0
    return val


def in_loop(curve: pd.DataFrame) -> pd.DataFrame:
    """The rows of one slice set: the fixed subset's where the run validated on one, else every row."""
    sub = curve[curve["subset"] == 1] if "subset" in curve else curve.iloc[:0]
    return sub if len(sub) else curve


def final_val_ap(curve: pd.DataFrame) -> float | None:
    """The run's final val AP on the whole split (the last row with ``subset`` 0); None without one."""
    whole = curve[curve["subset"] == 0] if "subset" in curve else curve
    return float(whole["ap_voc"].iloc[-1]) if len(whole) else None


def _iterations(run: Path, fallback: int) -> int:
    import yaml

    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        return int((yaml.safe_load(cfg_path.read_text()) or {}).get("train", {}).get("iterations", fallback))
    return fallback


def plateau(curve: pd.DataFrame, window: float = PLATEAU_WINDOW, tol: float = PLATEAU_TOL) -> dict[str, Any]:
    """Plateau criterion of one curve (see module docstring): ``final_ap`` (whole split), ``window_start_ap``,
    ``window_range`` (max - min over the window), ``change`` (window end - window start), ``checks`` in the
    window and ``at_plateau``; the window statistics on :func:`in_loop` rows."""
    if len(curve) == 0:
        return {"final_ap": None, "window_start_ap": None, "window_range": None, "change": None,
                "checks": 0, "at_plateau": False}
    loop = in_loop(curve)
    tail = loop[loop["fraction"] >= 1.0 - window - 1e-9]
    ap = tail["ap_voc"].astype(float)
    rng = float(ap.max() - ap.min()) if len(ap) else None
    final = final_val_ap(curve)
    return {"final_ap": final if final is not None else float(loop["ap_voc"].iloc[-1]),
            "window_start_ap": float(ap.iloc[0]) if len(ap) else None,
            "window_range": rng, "change": float(ap.iloc[-1] - ap.iloc[0]) if len(ap) else None,
            "checks": len(ap), "at_plateau": bool(len(ap) >= 2 and rng is not None and rng < tol)}


def plateau_table(runs: Mapping[str, Path | str], window: float = PLATEAU_WINDOW,
                  tol: float = PLATEAU_TOL) -> pd.DataFrame:
    """One row per run (``{label: run_dir}``): the plateau criterion of its validation curve."""
    rows = [{"run": label, **plateau(val_curve(run), window, tol)} for label, run in runs.items()]
    df = pd.DataFrame(rows, columns=["run", "final_ap", "window_start_ap", "window_range", "change", "checks",
                                     "at_plateau"])
    return df.rename(columns={"final_ap": "val AP (end)", "window_start_ap": f"val AP at {1 - window:.0%}",
                              "window_range": f"max-min over last {window:.0%}",
                              "change": f"change over last {window:.0%}", "checks": "checks in window",
                              "at_plateau": f"plateau (< {tol})"})


def converged(at_plateau: bool, final_ap: float | None, best_ap: float | None,
              gap: float = CONVERGENCE_GAP) -> bool:
    """The convergence rule (module docstring): at a plateau and a final val AP within ``gap`` of ``best_ap``,
    the best final val AP among the seeds of the run's arm."""
    if not at_plateau or final_ap is None or best_ap is None:
        return False
    return bool(best_ap - final_ap <= gap + 1e-12)


def convergence_table(runs: Mapping[str, Path | str], arms: Mapping[str, str], window: float = PLATEAU_WINDOW,
                      tol: float = PLATEAU_TOL, gap: float = CONVERGENCE_GAP) -> pd.DataFrame:
    """:func:`plateau_table` of ``runs`` (``{label: run_dir}``) with the convergence rule: ``arm`` (``arms``
    maps each label to its arm, e.g. ``SSD-512``), ``best val AP (end) of arm``, ``below best of arm`` and
    ``converged`` (:func:`converged`). Every run has its row, a failing one included."""
    df = plateau_table(runs, window, tol)
    end, flat = "val AP (end)", f"plateau (< {tol})"
    df.insert(1, "arm", [arms[label] for label in df["run"]])
    best = pd.to_numeric(df[end], errors="coerce").groupby(df["arm"]).transform("max")
    df["best val AP (end) of arm"] = best
    df["below best of arm"] = best - pd.to_numeric(df[end], errors="coerce")
    df["converged"] = [converged(bool(p), None if pd.isna(a) else float(a), None if pd.isna(b) else float(b),
                                 gap) for p, a, b in zip(df[flat], df[end], best)]
    return df


def plot_learning_curves(runs: Mapping[str, Path | str], ax: Any = None, title: str = "") -> Any:
    """Val AP against the fraction of training for every run (one line each), the plateau window shaded."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, run in runs.items():
        c = in_loop(val_curve(run))  # one slice set per line (the fixed subset where there is one)
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
