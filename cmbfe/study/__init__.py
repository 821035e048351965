"""The study wing: what the notebooks run to set this reproduction beside the paper.

Modules (the core never imports this package; :mod:`cmbfe.detect` never imports it either):

- :mod:`~cmbfe.study.runs` — cached data, runs and predictions by configuration hash, a run evaluated on a
  split (:func:`evaluate_run`), tables and figures into the profile's folders. Its names are re-exported
  here, so notebooks write ``from cmbfe import study`` and ``study.ensure_run(cfg)``.
- :mod:`~cmbfe.study.report` — Table 1, 2 and Fig. 3-7 (notebooks 01, 04, 05);
  :mod:`~cmbfe.study.operating_point` — Table 4 (05).
- :mod:`~cmbfe.study.experiments` — cross-validation, Table 3, ablations, FE readings (06-08).
- :mod:`~cmbfe.study.mechanism` — why an FE reading helps or hurts (08).
- :mod:`~cmbfe.study.curves` — learning curves and the plateau criterion.
- :mod:`~cmbfe.study.tables` — writing result tables; :mod:`~cmbfe.study.paper` — the paper's numbers.
- :mod:`~cmbfe.study.reproduce` — ``cmbfe reproduce`` (the notebooks with papermill).
- :mod:`~cmbfe.study.ship` — choosing and shipping the model ``cmbfe detect`` uses.
"""

from __future__ import annotations

from cmbfe.study.runs import (
    KEY_NEUTRAL,
    data_key,
    ensure_data,
    ensure_holdout,
    ensure_predictions,
    ensure_run,
    evaluate_run,
    grid_config,
    gt_and_detections,
    holdout_key,
    main_grid,
    run_key,
    run_tag,
    save_figure,
    save_table,
    with_overrides,
)

__all__ = ["KEY_NEUTRAL", "data_key", "ensure_data", "ensure_holdout", "ensure_predictions", "ensure_run",
           "evaluate_run", "grid_config", "gt_and_detections", "holdout_key", "main_grid", "run_key",
           "run_tag", "save_figure", "save_table", "with_overrides"]
