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
# # 08 — Ablations the paper did not run
#
# - **placement**: FE after the conv4_3 L2Norm (cmbfe's default: the head sees it) vs before it
#   (paper-literal inline layer: the channel-wise L2Norm cancels a per-pixel scale, so only deeper
#   layers change);
# - **schedule**: constant α (paper) vs cosine decay 1 → 0 (train/test gap closes by the end);
# - **variant**: FE (multiplicative) vs Assisted Excitation (additive channel mean);
# - **priors**: standard SSD priors vs priors sized to 2–10 mm CMBs;
# - **input**: the slice replicated (gray3) vs neighbouring slices (2.5D), which can tell a vein
#   (continues across slices) from a CMB.
#
# Each row: AP and precision at 90 % sensitivity with a 95 % patient-bootstrap interval.

# %% tags=["parameters"]
profile = "smoke"

# %%
from cmbfe import config, experiments, study

cfg = config.load(profile)
pre = study.ensure_data(cfg)
abl = experiments.ablations(cfg, pre)
if abl.empty:  # study.ablations: [] — ablation models trained to a plateau cost more than this profile's budget
    print(f"profile '{profile}' runs no ablations (study.ablations: []); profile 'extended' does")
else:
    study.save_table(abl, cfg, "ablations", caption=f"Ablations (not in the paper). {cfg.study.reduced}")
abl
