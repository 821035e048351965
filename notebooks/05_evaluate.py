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
# # 05 — Evaluation: Table 2 (SSD-300 and SSD-512), Fig. 4, Fig. 5, Table 4, Fig. 6/7 and mimic attribution
#
# Every configuration of the main comparison (size × FE off/on × seed) is evaluated on the
# test split: VOC rule (IoU ≥ 0.5, greedy by score), all-point AP, precision at 90 % sensitivity,
# FP per CMB, FROC. Uncertainty: mean over seeds with a t-interval, and bootstrap over test
# patients (95 %); SSD-FE minus SSD by a paired patient bootstrap. The paper's numbers (private
# data) stand beside ours, labelled.

# %% tags=["parameters"]
profile = "smoke"

# %%
import matplotlib.pyplot as plt

from cmbfe import config, study
from cmbfe.study import report

cfg = config.load(profile)
pre = study.ensure_data(cfg)
ev = report.evaluate_main(cfg, pre)
note = cfg.study.reduced

# %% [markdown]
# ## Were the detectors trained? Learning curves, the plateau criterion and the convergence rule
#
# Every run validates every 10 % of its training. A run is at a plateau when its validation AP moves by
# less than 0.02 (absolute) over the last 20 % of training. A plateau alone passes a dead run (one stuck at a
# low AP while the LR is held low is flat too), so a run has **converged** only when it is at a plateau and
# its final val AP is within 0.05 of the best seed of its arm (same model and FE setting). Every run is
# listed, a failing one too; a table of results from runs that have not converged is no evidence of
# anything. With `train.val_subset` the curve is the fixed val subset's and the final val AP the whole
# split's.

# %%
fig_curves, plateau = report.learning_curves(cfg, ev)
study.save_figure(fig_curves, cfg, "fig_learning_curves")
study.save_table(plateau, cfg, "plateau",
                 caption="Plateau criterion and convergence rule per run: validation AP (IoU 0.5, all-point) "
                         "over the last 20 % of training must move by < 0.02 (plateau), and the final val AP "
                         "(whole val split) must also be within 0.05 of the best seed of the run's arm "
                         f"(converged). {note}")
plateau

# %% [markdown]
# ## Table 2 — VOC AP, SSD vs SSD-FE

# %%
t2 = report.table2(cfg, ev)
study.save_table(t2, cfg, "table2_ap", caption=f"Table 2: VOC AP (IoU 0.5, all-point). {note}")
t2

# %%
paired = report.paired_fe(cfg, ev)
study.save_table(paired, cfg, "fe_minus_ssd_paired_bootstrap",
                 caption="SSD-FE minus SSD, paired bootstrap over test patients (seed 0 runs), and over "
                         "seeds")
paired

# %% [markdown]
# ## Fig. 4 — sensitivity–precision, Fig. 5 — FROC

# %%
fig4, fig5 = report.curves_figures(cfg, ev)
study.save_figure(fig4, cfg, "fig4_sensitivity_precision")
study.save_figure(fig5, cfg, "fig5_froc")
plt.show()

# %% [markdown]
# ## Table 4 — sensitivity, precision, FP/CMB at the 90 % sensitivity operating point
#
# The paper does not say when a detection hits a CMB: both rules side by side (IoU ≥ 0.5, as Table 2; box
# centres ≤ 2.5 mm apart, as VALDO), at slice level and for 3D lesions (detections linked across adjacent
# slices). A rule that never reaches 90 % says so, with the maximum sensitivity it reaches.

# %%
from cmbfe.study import operating_point

pts = operating_point.points(cfg, ev)
t4 = operating_point.table4(cfg, pts)
t4_caption = operating_point.caption(cfg, pts)
study.save_table(t4, cfg, "table4_operating_point", caption=t4_caption)
print(t4_caption)
t4

# %% [markdown]
# ## The hold-out cohort: Table 2 and Table 4 on patients nobody looked at
#
# The same runs (trained on the study's cohort, nothing retrained) predict the hold-out cohort (notebook 01:
# its own seed, the same generator and label model, never used to choose anything): Table 2 with the same
# columns as on the test split, Table 4 beside the test split's, and each arm's mean AP on both.

# %%
pre_holdout = study.ensure_holdout(cfg)
if pre_holdout is None:
    print(f"profile {cfg.profile}: holdout.patients is 0, no hold-out cohort")
else:
    ev_holdout = report.evaluate_main(cfg, pre_holdout, "holdout")
    t2h = report.table2(cfg, ev_holdout)
    study.save_table(t2h, cfg, "table2_holdout",
                     caption=f"Table 2 on the hold-out cohort ({cfg.holdout.patients} patients, synth seed "
                             f"{cfg.holdout.seed}): VOC AP (IoU 0.5, all-point). {note}")
    pts_holdout = operating_point.points(cfg, ev_holdout)
    t4h = operating_point.table4(cfg, pts_holdout)
    study.save_table(t4h, cfg, "table4_operating_point_holdout",
                     caption="On the hold-out cohort: " + operating_point.caption(cfg, pts_holdout))
    vs = report.holdout_vs_test(cfg, ev, ev_holdout)
    study.save_table(vs, cfg, "holdout_vs_test",
                     caption="Mean AP over seeds per arm on the test split and on the hold-out cohort. "
                             f"{note}")
    display(t2h, t4h, vs)

# %% [markdown]
# ## Fig. 6/7 — false positives FE removes, CMBs only FE finds

# %%
fig6, fig7 = report.fe_difference_tiles(cfg, ev, pre)
study.save_figure(fig6, cfg, "fig6_fp_removed_by_fe")
study.save_figure(fig7, cfg, "fig7_cmbs_found_by_fe")
plt.show()

# %% [markdown]
# The null beside Figs 6/7: two SSD runs that differ only in their seed also "remove" false positives and
# "find" CMBs the other misses. The counts FE shows are a finding only where they stand above these.

# %%
from cmbfe.study import mechanism

null = mechanism.difference_null(cfg, ev)
study.save_table(null, cfg, "fig6_7_null",
                 caption="Figs 6/7 counts (each model at its 90 %-sensitivity threshold): SSD-FE vs SSD of the "
                         f"same seed, and the null, SSD vs SSD of two seeds. {note}")
study.save_figure(mechanism.plot_difference_null(null), cfg, "fig6_7_null")
null

# %% [markdown]
# ## What the IoU rule costs on small CMBs
#
# Sensitivity over all detections by ground-truth box size (longer side, mm), under Table 2's IoU
# rule and under the centre-distance rule used by VALDO; and AP under each. A slice through the edge
# of a CMB gives a box of one or two pixels, where half a pixel of offset fails IoU ≥ 0.5.

# %%
sizes = report.size_table(cfg, ev)
study.save_table(sizes, cfg, "recall_by_box_size",
                 caption="Sensitivity by GT box size and AP, IoU vs centre matching (mean over seeds). "
                         f"{note}")
sizes

# %% [markdown]
# The same detections scored against two label models of the same test slices: the boxes as labelled
# (`preprocess.labels`; default `annotator`: visible foci, sides >= 2 mm) and the geometric
# cross-sections of the spheres (`cmbfe.labels`).

# %%
labels_ap = report.label_model_table(cfg, ev, pre)
study.save_table(labels_ap, cfg, "ap_by_label_model",
                 caption=f"AP under each label model and matching rule (mean over seeds). {note}")
labels_ap

# %% [markdown]
# Where the centre rule finds a CMB, how large is the predicted box? A median ratio of predicted to
# ground-truth box side well below 1 means the IoU rule fails on box size, not on finding the lesion.

# %%
scale = report.box_scale_table(cfg, ev)
study.save_table(scale, cfg, "box_scale",
                 caption="Predicted vs GT box side for centre-matched detections "
                         f"(<= {cfg.eval.radius_mm:g} mm), per seed. {note}")
scale

# %% [markdown]
# ## Which mimics the false positives fall on (synthetic data knows)

# %%
mim = report.mimic_table(cfg, ev)
study.save_table(mim, cfg, "fp_mimic_attribution",
                 caption="False positives by the mimic they overlap, at the 90 % sensitivity operating point "
                         "(or over all detections where a seed never reaches it: see the column)")
mim

# %% [markdown]
# ## The shipped model of `cmbfe detect`
#
# The best seed of the largest size by validation AP (SSD-FE only if it beats every SSD) is exported with
# its operating threshold (the highest reaching 90 % **3D lesion** sensitivity on the validation split,
# centre rule), its test-split metrics and its model card, and its second stage is trained on the train split's
# candidates (`cmbfe.detect.stage2_fit`): to `models/` for the default profile (committed), to
# `runs/<profile>/model` otherwise. With `study.ship: false` the model folder is left as it is (it is then a
# released model with its own card, rebuilt on its own by `make ship`). Notebook 09 runs it on held-out patients.

# %%
from cmbfe.study import ship

shipped = ship.ship_model(cfg, pre) if cfg.study.ship else ship.ensure_model(cfg, pre)
print((shipped / "README.md").read_text())
