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
# # 02 — Augmentation: the paper's policy, with boxes that follow the image
#
# Paper §2.2: vertical and horizontal flips (p = 0.5), intensity × U[1.2, 1.5], Gaussian blur
# σ ∈ [0, 3], affine (translate ≤ 15 px, rotate ±30°, scale [0.8, 0.95]). The paper expanded 467
# training slices offline to 4434; cmbfe draws a fresh augmentation per batch (online), built on
# `torchvision.transforms.v2`, which moves `BoundingBoxes` with the image and drops boxes that
# leave it.

# %% tags=["parameters"]
profile = "smoke"
n_examples = 4
seed = 0

# %%
import matplotlib.pyplot as plt

from cmbfe import config, study, viz

cfg = config.load(profile)
pre = study.ensure_data(cfg)
fig = viz.augment_examples(pre, cfg.augment, n=n_examples, seed=seed)
study.save_figure(fig, cfg, "fig_augment_examples")
plt.show()
