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
# test set holds its CMB slices plus as many mimic-only slices.

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
                     caption=f"{cfg.study.folds}-fold CV, mean AP. {cfg.study.reduced}")
    display(summary)  # noqa: F821 - IPython
