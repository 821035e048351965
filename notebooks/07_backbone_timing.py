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
# Per backbone and input size: precision at 90 % recall on the test split and training seconds per
# batch (median over repeats of a full forward + backward + Adam step, with and without FE, on the
# device this notebook runs on — recorded in the table). The paper's times are from its GPU;
# compare ratios (with FE / without), not seconds.

# %% tags=["parameters"]
profile = "smoke"

# %%
from cmbfe import config, study
from cmbfe.study import experiments

cfg = config.load(profile)
pre = study.ensure_data(cfg)
t3 = experiments.table3(cfg, pre)
study.save_table(t3, cfg, "table3_backbones", caption=f"Table 3. {cfg.study.reduced}")
t3
