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
from cmbfe import config, experiments, study

cfg = config.load(profile)
pre = study.ensure_data(cfg)
t3 = experiments.table3(cfg, pre)
study.save_table(t3, cfg, "table3_backbones", caption=f"Table 3. {cfg.study.reduced}")
t3
