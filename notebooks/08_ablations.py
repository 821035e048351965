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
# - **placement**: FE before the conv4_3 L2Norm (R1, cmbfe's default `fe.placement: pre_l2norm`: the
#   paper-literal inline layer; the channel-wise L2Norm cancels a per-pixel scale, so only deeper layers
#   change) vs after it (R2, `post_l2norm`: the head sees FE, a cue it never gets at test time);
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
from cmbfe import config, study
from cmbfe.study import experiments

cfg = config.load(profile)
pre = study.ensure_data(cfg)
abl = experiments.ablations(cfg, pre)
if abl.empty:  # study.ablations: [] — ablation models trained to a plateau cost more than this budget
    print(f"profile '{profile}' runs no ablations (study.ablations: []); profile 'extended' does")
else:
    study.save_table(abl, cfg, "ablations", caption=f"Ablations (not in the paper). {cfg.study.reduced}")
abl

# %% [markdown]
# ## Does FE help? Every reading of the paper's FE against SSD, paired on seeds (issues #10, #19)
#
# R1 (the default: X + M·X inline before the conv4_3 L2Norm), R2 (after the L2Norm: the head sees FE, a
# train-only cue; R2 constant is the leak, kept as a demonstration), R3 (X + M·L2Norm_c X), R4
# (X + α·M·mean_c X, graded mask) and Assisted Excitation as published (binary mask, channel mean, α decayed
# to 0); and two controls: **R1 sham**, R1's α and per-box masks moved, unchanged, to random places that
# overlap no CMB (the null for "any training-only feature perturbation"), and the **mask loss**, a leak-free
# reuse of the ground truth (a 1×1 head on conv4_3 predicts M with BCE beside the detection loss; dropped at
# test). Each arm is trained with its seeds (`study.fe_arm_seeds`; profile `fe-readings`: 5 for no FE, R1,
# sham and mask, 3 for the others) on the main recipe; each arm minus SSD with a paired patient bootstrap per
# seed and a t-interval over seeds, Holm-adjusted p over the arms, beside SSD's own seed SD. Profiles that
# list no arms (`study.fe_arms: []`, the default) skip this.

# %%
per_seed, readings = experiments.fe_readings(cfg, pre)
if readings.empty:
    print(f"profile '{profile}' compares no FE readings (study.fe_arms: []); profile 'fe-readings' does")
else:
    study.save_table(per_seed, cfg, "fe_readings_per_seed",
                     caption="FE readings, per seed: AP and AP - SSD (paired patient bootstrap). "
                             f"{cfg.study.reduced}")
    study.save_table(readings, cfg, "fe_readings",
                     caption="FE readings: mean AP over seeds, mean AP - SSD with a t-interval over seeds, "
                             "its p and the Holm-adjusted p over the arms, SSD's seed SD; the paper's one-run "
                             "SSD-512 gain beside R1. "
                             f"{cfg.study.reduced}")
    study.save_figure(experiments.fe_readings_figure(per_seed), cfg, "fig_fe_readings")
readings

# %% [markdown]
# ## Why: the train/test mismatch of each FE run (`cmbfe.study.mechanism`)
#
# For every FE run of Table 2 (and of the readings above), measured in a training forward (training windows
# at the training input side): the conv4_3 head input with FE (training) against without (test), inside and
# outside the GT boxes, the relative change of every source map (R1: none at the conv4_3 head, some deeper),
# the share of positive default boxes on the conv4_3 head, and the training loss on a fixed batch with FE on
# and off at the end of training (over training where the run logged `fe_gap.csv`). The predicted/GT box side at
# test is in `05_evaluate` (`results/box_scale.md`).

# %%
from cmbfe.study import mechanism

fe_runs = {f"SSD-FE {g['size']} seed {g['seed']}": study.ensure_run(study.grid_config(cfg, **g))
           for g in study.main_grid(cfg) if g["fe"]}
arm_seeds = experiments.arm_seeds(cfg, ["no FE", *cfg.study.fe_arms]) if cfg.study.fe_arms else {}
arms = {f"{a} seed {s}": config.with_overrides(cfg, {**experiments.FE_ARMS[a], "train.seed": s})
        for a in cfg.study.fe_arms if a != "no FE" for s in arm_seeds[a]}
fe_runs |= {label: study.ensure_run(c) for label, c in arms.items()}
mech = mechanism.mechanism_table(cfg, fe_runs, pre)
study.save_table(mech, cfg, "fe_mechanism",
                 caption="FE runs: head input with FE (training) vs without (test), inside / outside the GT "
                         "boxes, and the fixed-batch training loss with FE on / off at the end. "
                         f"{cfg.study.reduced}")
gap_fig = mechanism.plot_fe_gap(fe_runs)
if gap_fig is not None:
    study.save_figure(gap_fig, cfg, "fig_fe_gap")
mech
