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
# # 03 — Train one detector
#
# One configuration per execution: `cmbfe reproduce` runs this notebook once for every entry of
# `notebooks.03_train` in the profile (the main comparison: each size × FE off/on × seed).
# Runs are cached under `runs/<profile>/` by a hash of their configuration, so a rerun with the
# same parameters returns at once, and a killed run resumes from its last checkpoint.

# %% tags=["parameters"]
profile = "smoke"
size = None  # network input in px; None keeps the profile's model.size
fe = False  # feature enhancement at conv4_3 during training
seed = 0
backbone = None  # vgg16 | resnet34 | mobilenet_v3; None keeps the profile's
priors = None  # paper | cmb
input_channels = None  # gray3 | 2.5d
fe_placement = None  # post_l2norm | pre_l2norm
fe_schedule = None  # constant | cosine
fe_variant = None  # fe | ae
iterations = None

# %%
import json

import matplotlib.pyplot as plt
import pandas as pd

from cmbfe import config, study

base = config.load(profile)
extra = {k: v for k, v in {"model.backbone": backbone, "model.priors": priors, "model.input": input_channels,
                          "fe.placement": fe_placement, "fe.schedule": fe_schedule,
                          "fe.variant": fe_variant, "train.iterations": iterations}.items() if v is not None}
cfg = study.grid_config(base, size=size, fe=fe, seed=seed, overrides=extra)
pre = study.ensure_data(cfg)
run = study.ensure_run(cfg)
# test- and validation-set detections are computed here (cached in the run folder), so that side-by-side
# executions of this notebook share the inference cost; 05_evaluate reads them (val: choosing the shipped
# model; the hold-out cohort's detections likewise, for 05's table2_holdout)
study.ensure_predictions(run, pre, "test")
study.ensure_predictions(run, pre, "val")
pre_holdout = study.ensure_holdout(cfg, progress=False)  # built by 01_data; None when holdout.patients is 0
if pre_holdout is not None:
    study.ensure_predictions(run, pre_holdout, "holdout")
print("run:", run.relative_to(config.REPO_ROOT))
print(json.dumps(json.loads((run / "model.json").read_text()), indent=1)[:1500])

# %% [markdown]
# ## Training curve and validation AP

# %%
log = pd.read_csv(run / "log.csv")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(log["iteration"], log["loss"], label="total")
ax.plot(log["iteration"], log["bbox_loss"], label="box regression")
ax.plot(log["iteration"], log["cls_loss"], label="classification")
ax.set_xlabel("iteration")
ax.set_ylabel("loss")
ax.set_title(study.run_tag(cfg))
ax.legend()
plt.show()
val = pd.read_csv(run / "val.csv") if (run / "val.csv").exists() else None
val
