"""Table 3's recall/precision cells (only from runs at a plateau) and the CV summary's interval (no training)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from cmbfe import config, stats
from cmbfe import metrics as M
from cmbfe.study import experiments, report


def _run(tmp_path, name, aps):
    """A run folder with ``train.iterations`` 1000 and validations every 100 iterations at APs ``aps``."""
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"iterations": 100 * len(aps)}}))
    pd.DataFrame({"iteration": [100 * (i + 1) for i in range(len(aps))], "ap_voc": aps}).to_csv(
        run / "val.csv", index=False)
    return run


def _res(tp):
    """An evaluated run of 10 GT boxes whose score-sorted detections hit as ``tp``."""
    tp = np.asarray(tp, bool)
    scores = np.linspace(1.0, 0.1, len(tp))
    c = M.curve(scores, tp, 10, 2, 4)
    return {"curve": c, "metrics": {"ap_voc": M.ap_voc(tp, 10), "sensitivity": tp.sum() / 10}}


def test_table3_cells_only_from_converged_runs(tmp_path):
    flat = _run(tmp_path, "flat", [0.1, 0.3, 0.5, 0.6, 0.60, 0.61, 0.60, 0.61, 0.60, 0.61])
    moving = _run(tmp_path, "moving", [0.1, 0.3, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7])
    once = _run(tmp_path, "once", [0.6])
    # 9 of 10 CMBs found by the 11th detection, with 2 false positives before: recall 0.9, precision 9/11
    good = _res([1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1])
    cells = experiments.operating_point_columns(good, flat, "SSD-FE")
    run = report.RUN
    assert cells[f"recall at the 90% point SSD-FE {run}"] == 0.9
    assert cells[f"precision at 90% recall SSD-FE {run}"] == pytest.approx(round(9 / 11, 4))
    assert cells[f"converged SSD-FE {run}"] is True
    assert all(c.endswith(run) for c in cells)
    c = experiments.operating_point_columns(good, moving, "SSD")
    assert c[f"precision at 90% recall SSD {run}"] == "not converged (val AP moved 0.100 over the last 20 %)"
    assert c[f"recall at the 90% point SSD {run}"].startswith("not converged") and not c[f"converged SSD {run}"]
    c = experiments.operating_point_columns(good, once, "SSD")
    assert c[f"precision at 90% recall SSD {run}"] == "not converged (fewer than 2 validations in the window)"
    short = _res([1, 1, 0, 1, 1, 1, 0, 1])  # 6 of 10 at most
    c = experiments.operating_point_columns(short, flat, "SSD")
    assert c[f"recall at the 90% point SSD {run}"] == "max 0.600 (< 90%)"
    assert c[f"precision at 90% recall SSD {run}"] == "n/a (90% recall not reached)"


def test_cv_summary_gives_the_mean_with_its_t_interval_over_folds():
    cfg = config.load("smoke")
    ssd, fe = [0.50, 0.70, 0.60, 0.55, 0.65], [0.55, 0.72, 0.66, 0.55, 0.70]
    folds = pd.DataFrame({"fold": range(5), "AP SSD": ssd, "AP SSD-FE": fe,
                          "AP difference (FE - SSD)": np.subtract(fe, ssd)})
    s = experiments.cv_summary(cfg, folds).set_index("model")
    col = f"mean AP [95% t-interval over folds] {report.RUN}"
    cs = stats.combine_seeds(ssd)
    assert s.loc["SSD", col] == f"{cs['mean']:.3f} [{cs['lo']:.3f}, {cs['hi']:.3f}]"
    assert cs["lo"] < 0.6 < cs["hi"]
    d = stats.combine_seeds(np.subtract(fe, ssd))
    assert s.loc["FE - SSD (paired by fold)", col] == f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
