# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 — Patient-level k-fold cross-validation, SSD vs SSD-FE
#
# The paper reports a 10-fold cross-validation (mean AP 0.73 for SSD, 0.75 for SSD-FE). Folds are
# drawn over patients, so no patient's slices are in both training and test of a fold. Each fold's
# test set holds its CMB slices plus as many mimic-only slices; the next fold's patients are its
# validation split. Every fold trains SSD and SSD-FE with the same seed and recipe (`study.cv_iterations`);
# the summary gives the mean AP over folds with a 95 % t-interval (folds as replicates) and the paired
# difference. Profile `extended` runs 5 folds; runs are cached, so a killed run resumes.

# %% tags=["parameters"]
profile = "smoke"

# %%
from cmbfe import config, study
from cmbfe.study import experiments

cfg = config.load(profile)
pre = study.ensure_data(cfg)
folds = experiments.cross_validate(cfg, pre)
if folds.empty:  # study.folds: 0 — CV models trained to a plateau cost more than this profile's budget
    print(f"profile '{profile}' runs no cross-validation (study.folds: 0); profile 'extended' does")
else:
    study.save_table(folds, cfg, "cv_folds", caption=f"AP per fold. {cfg.study.reduced}")
folds

# %%
if not folds.empty:
    summary = experiments.cv_summary(cfg, folds)
    study.save_table(summary, cfg, "cv_summary",
                     caption=f"Patient-level {cfg.study.folds}-fold CV, test AP (IoU 0.5, all-point) per fold: "
                             "mean over folds [95 % t-interval over folds], SD and range; FE - SSD paired by "
                             f"fold. The paper's 10-fold means beside them. {cfg.study.reduced}")
    display(summary)  # noqa: F821 - IPython
