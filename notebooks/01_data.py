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
# # 01 — Data: the synthetic SWI cohort, preprocessing and Table 1
#
# The paper's 58-patient SWAN data set is private. cmbfe synthesises a cohort of SWI magnitude
# volumes (DICOM series) from the MNI152 template with a physics-based forward model: dipole field of
# tissue iron, veins, air and the lesions themselves, so CMBs *bloom*, veins crossing the slice look
# like dots, calcifications and basal-ganglia iron are dark, a bias field and Rician noise are added.
# Then the paper's pipeline: N4 bias correction, 8-bit slices, patient-level split, COCO boxes.
#
# To use your own data instead, see the README ("Your own data").

# %% tags=["parameters"]
profile = "smoke"

# %%
import pandas as pd
import matplotlib.pyplot as plt

from cmbfe import config, study, viz
from cmbfe.datadir import DataDir
from cmbfe.study import report

cfg = config.load(profile)
print(f"profile {cfg.profile}: {cfg.synth.patients} patients, matrix {cfg.synth.matrix}, "
      f"{cfg.synth.fov_mm:g} mm FOV, {cfg.synth.slice_mm:g} mm slices")
pre = study.ensure_data(cfg)
print("preprocessed data:", pre.relative_to(config.REPO_ROOT))

# %% [markdown]
# ## Table 1 — the patient-level split (this run beside the paper's private data)
# "CMBs" counts boxes on slices, as the paper's Table 1 does (a CMB crossing two slices counts twice).

# %%
t1 = report.table1(pre)
study.save_table(t1, cfg, "table1_split",
                 caption=f"Table 1: patients / CMB slices / CMBs per split; box side = longer side in mm "
                         f"(labels: {cfg.preprocess.labels}). {cfg.study.reduced}")
t1

# %% [markdown]
# ## Box sizes under the two label models
# `annotator` (the default): a box on every slice where the rendered focus is visible (signal drop >= 30 % of
# the local background and >= 3x its noise), enclosing the hypointensity at half depth, no side under 2 mm
# (the lower bound of the CMB definition). `geometric`: the sphere's cross-section on every slice it crosses,
# down to one pixel. The val/test splits carry both (`DataDir(pre).coco(split, geometric=True)`).

# %%
sizes = report.box_size_table(pre)
study.save_table(sizes, cfg, "table1_box_sizes",
                 caption="CMB boxes per split by longer side (mm), as labelled and as geometric "
                         "cross-sections")
sizes

# %% [markdown]
# ## What a slice looks like
# CMBs in red; mimics: veins (blue), calcifications (orange), basal-ganglia iron (yellow), air artefacts
# (magenta).

# %%
fig = viz.data_examples(pre, n=3)
study.save_figure(fig, cfg, "fig_data_examples")
plt.show()

# %%
objects = pd.read_csv(DataDir(pre).slice_objects)
objects.groupby("kind").size().rename("per-slice objects").to_frame()
