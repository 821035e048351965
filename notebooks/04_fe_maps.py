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
# # 04 — Where feature enhancement acts (Fig. 3)
#
# FE builds a mask from the ground-truth boxes: inside a box, pixels darker than β·mean(box) get
# 1 − P/(β·mean), others 0; the mask is area-averaged to the conv4_3 map and the features become
# X + α·M·X. Columns: the slice with its ground-truth box; the mask M at the first detection source; that
# source's features before and after FE (mean over channels, one grey scale); and after − before on a
# diverging colormap centred on zero: white is "no change", red "FE raised it", blue "FE lowered it".
#
# In JupyterLab the explorer at the end has sliders over the example and the channel; headless
# runs (papermill, CI) save the static figure.

# %% tags=["parameters"]
profile = "smoke"
size = None
seed = 0
n_images = 3

# %%
import matplotlib.pyplot as plt

from cmbfe import config, study, viz
from cmbfe.study import report

cfg = study.grid_config(config.load(profile), size=size, fe=True, seed=seed)
pre = study.ensure_data(cfg)
run = study.ensure_run(cfg)
maps = report.fe_examples(run, pre, n=n_images)
fig = viz.fe_figure(maps)
study.save_figure(fig, cfg, "fig3_fe_maps")
plt.show()

# %% [markdown]
# Pixels outside every box are untouched (the mask is 0 there: white in the last column). What the head
# sees depends on the reading: the default R1 enhances conv4_3 *before* its L2Norm, which divides every
# position by its own channel norm, so (1 + α·M)·X is normalised back to X — the last column stays white
# for R1, and FE reaches only the deeper layers (`08_ablations`, the mechanism table). The per-channel view
# shows that the multiplicative form X + α·M·X amplifies channels in proportion to how strongly they
# already respond.

# %%
viz.fe_explorer(maps)
