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
# "3D CMBs" are the CMBs with at least one box; "true 3D CMBs" every CMB the generator placed (`lesions.csv`),
# boxed or not: the label model leaves a CMB too faint or too small to see without a box, and a detector
# scored against every true CMB misses it by construction.

# %%
t1 = report.table1(pre)
study.save_table(t1, cfg, "table1_split",
                 caption=f"Table 1: patients / CMB slices / CMBs (per-slice boxes) per split; 3D CMBs with a "
                         f"box, every true 3D CMB of lesions.csv, those the label model left without a box and "
                         f"the share boxed; box side = longer side in mm (labels: {cfg.preprocess.labels}). "
                         f"{cfg.study.reduced}")
t1

# %% [markdown]
# ## The hold-out cohort
# A second test cohort, synthesised by the same generator and labelled by the same label model from its own
# seed (`holdout.seed`, fixed in the profile), patients `HOLD-0001` ...: never used to choose anything (no
# recipe, threshold or model was picked on it). Notebook 05 evaluates every Table 2 run on it.

# %%
pre_holdout = study.ensure_holdout(cfg)
if pre_holdout is None:
    print(f"profile {cfg.profile}: holdout.patients is 0, no hold-out cohort")
else:
    print("hold-out cohort:", pre_holdout.relative_to(config.REPO_ROOT), f"(seed {cfg.holdout.seed})")
    t1h = report.table1(pre_holdout, ("holdout",))
    study.save_table(t1h, cfg, "table1_holdout",
                     caption=f"The hold-out cohort ({cfg.holdout.patients} patients, synth seed "
                             f"{cfg.holdout.seed}, one split built as the test split is), counted as Table 1. "
                             f"{cfg.study.reduced}")
    display(t1h)

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
