"""Plateau criterion and learning-curve plot from val.csv files."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
import yaml

from cmbfe.study.curves import (
    converged,
    convergence_table,
    final_val_ap,
    in_loop,
    plateau,
    plateau_table,
    plot_learning_curves,
    val_curve,
)


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


def test_convergence_rule_rejects_a_flat_dead_run_and_keeps_its_row(tmp_path):
    rise = [0.1, 0.2, 0.3, 0.4, 0.5, 0.55]
    runs = {"A s0": _run(tmp_path, "a0", rise + [0.6, 0.61, 0.615, 0.62]),
            "A s1": _run(tmp_path, "a1", rise + [0.56, 0.57, 0.575, 0.58]),  # 0.04 below the best: fine
            "A s2": _run(tmp_path, "a2", [0.1, 0.12] + [0.12] * 8),  # dead: flat at 0.12, passes the plateau
            "B s0": _run(tmp_path, "b0", rise + [0.3, 0.3, 0.3, 0.3])}  # alone in its arm: the plateau rule
    arms = {"A s0": "A", "A s1": "A", "A s2": "A", "B s0": "B"}
    t = convergence_table(runs, arms)
    assert list(t["run"]) == list(runs) and list(t["arm"]) == ["A", "A", "A", "B"]  # every run, none dropped
    assert list(t["plateau (< 0.02)"]) == [True, True, True, True]
    assert list(t["converged"]) == [True, True, False, True]
    assert t["best val AP (end) of arm"].tolist() == pytest.approx([0.62, 0.62, 0.62, 0.3])
    assert t["below best of arm"].tolist() == pytest.approx([0.0, 0.04, 0.5, 0.0])
    rising = _run(tmp_path, "a3", [0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.61, 0.64, 0.66])  # best, still rising
    t2 = convergence_table({"best": rising, "flat": runs["A s0"]}, {"best": "A", "flat": "A"})
    assert list(t2["converged"]) == [False, True]  # not at a plateau / 0.04 below the best
    assert converged(True, 0.55, 0.60) and not converged(True, 0.549, 0.60) and not converged(False, 0.6, 0.6)
    assert not converged(True, None, 0.6)


def test_subset_rows_are_the_curve_and_the_whole_split_the_final_ap(tmp_path):
    run = tmp_path / "sub"
    run.mkdir()
    rows = [(it, 0.1 * k, 1, 30) for k, it in enumerate(range(10, 101, 10), 1)]
    rows = [(it, min(ap, 0.6), s, n) for it, ap, s, n in rows] + [(100, 0.72, 0, 120)]  # then the whole split
    pd.DataFrame(rows, columns=["iteration", "ap_voc", "subset", "slices"]).to_csv(run / "val.csv", index=False)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"iterations": 100}}))
    c = val_curve(run)
    assert len(in_loop(c)) == 10 and (in_loop(c)["subset"] == 1).all() and final_val_ap(c) == 0.72
    p = plateau(c)
    assert p["final_ap"] == 0.72 and p["window_range"] == pytest.approx(0.0) and p["checks"] == 3
    assert p["at_plateau"]  # the subset-vs-whole difference is no movement
    fig = plot_learning_curves({"r": run})
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == 10
    old = _run(tmp_path, "old", [0.2, 0.3])  # a val.csv without the column: every row, the last is final
    assert (val_curve(old)["subset"] == 0).all() and final_val_ap(val_curve(old)) == 0.3
