"""Plateau criterion and learning-curve plot from val.csv files."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
import yaml

from cmbfe.study.curves import plateau, plateau_table, plot_learning_curves, val_curve


def _run(tmp_path, name, aps, iterations=100):
    run = tmp_path / name
    run.mkdir()
    its = [round(iterations * (i + 1) / len(aps)) for i in range(len(aps))]
    pd.DataFrame({"iteration": its, "ap_voc": aps}).to_csv(run / "val.csv", index=False)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"iterations": iterations}}))
    return run


def test_plateau_uses_the_last_20_percent(tmp_path):
    flat = _run(tmp_path, "flat", [0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.61, 0.615, 0.62])
    rising = _run(tmp_path, "rising", [0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.61, 0.64, 0.66])
    p = plateau(val_curve(flat))
    assert p["checks"] == 3 and p["window_range"] == pytest.approx(0.01) and p["at_plateau"]
    assert p["change"] == pytest.approx(0.01) and p["final_ap"] == pytest.approx(0.62)
    q = plateau(val_curve(rising))
    assert q["window_range"] == pytest.approx(0.05) and not q["at_plateau"]
    t = plateau_table({"a": flat, "b": rising})
    assert list(t["plateau (< 0.02)"]) == [True, False] and list(t["run"]) == ["a", "b"]


def test_dip_inside_window_counts_and_missing_curve_is_not_a_plateau(tmp_path):
    dip = _run(tmp_path, "dip", [0.5] * 7 + [0.5, 0.45, 0.5])  # final = start, but a dip of 0.05 inside
    assert not plateau(val_curve(dip))["at_plateau"]
    empty = tmp_path / "never"
    empty.mkdir()
    assert plateau(val_curve(empty)) == {"final_ap": None, "window_start_ap": None, "window_range": None,
                                         "change": None, "checks": 0, "at_plateau": False}
    one = _run(tmp_path, "one", [0.7])  # a single check at the end cannot show a plateau
    assert not plateau(val_curve(one))["at_plateau"]


def test_plot_has_one_line_per_run(tmp_path):
    runs = {f"seed {s}": _run(tmp_path, f"s{s}", [0.1 * s, 0.2, 0.3]) for s in range(3)}
    fig = plot_learning_curves(runs, title="t")
    assert len(fig.axes[0].get_lines()) == 3
