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
# # 07 — Backbones and training time (Table 3)
#
# Per backbone and input size (the paper's: VGG-16 at 512, MobileNet at 320, ResNet-34 at 300): recall and
# precision at the paper's operating point (the highest score threshold reaching 90 % recall on the test
# split), without and with FE, from models trained with the profile's recipe **that pass the plateau
# criterion** (validation AP moving < 0.02 over the last 20 % of training; a run that does not says so in
# its cells instead of a number), and training seconds per batch (median over repeats of a full forward +
# backward + Adam step, with and without FE, on the device this notebook runs on — recorded in the table).
# The paper's times are from its GPU; compare ratios (with FE / without), not seconds. Profiles without
# `study.timing_precision` (default) time the steps only; profile `extended` trains the six models.

# %% tags=["parameters"]
profile = "smoke"

# %%
from cmbfe import config, study
from cmbfe.study import experiments

cfg = config.load(profile)
pre = study.ensure_data(cfg)
t3 = experiments.table3(cfg, pre)
what = ("recall and precision at 90 % recall (test split, IoU 0.5) from runs passing the plateau criterion, "
        "AP, and " if cfg.study.timing_precision else "")
study.save_table(t3, cfg, "table3_backbones",
                 caption=f"Table 3: {what}training seconds per batch of {cfg.study.timing_batch} without and "
                         f"with FE (ratio: FE cost). {cfg.study.reduced}")
t3
