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
# # 09 — `cmbfe detect` on a patient the model has never seen
#
# `cmbfe detect INPUT --out DIR` takes a scan (DICOM series folder, NIfTI file, or a folder of patients)
# and writes the CMB list in voxels and mm (`cmbs.csv`), a label mask on the scan's own grid
# (`cmbs_mask.nii.gz`, for ITK-SNAP / 3D Slicer), slice detections (`detections.json`), `report.json`, and a
# PDF/HTML report. Here it runs with the profile's shipped model (`models/` for the default profile,
# exported by 05_evaluate: the best seed's SSD by validation AP, and its second stage, a small 3D CNN that
# keeps or drops each 3D candidate, at the `balanced` operating point chosen on the validation split) on a
# synthetic patient generated from a seed the study never used, and the lesion
# list is compared with that patient's ground truth: hits, misses, and false positives by the mimic they
# fall on. Research use only: the model is trained on synthetic data and not validated on real patients.

# %% tags=["parameters"]
profile = "smoke"
patient_seed = 90001  # synthetic-cohort seed of the held-out patient (the study's cohort uses synth.seed)
patient_index = 0
n_pages = 2  # report pages shown below

# %%
import shutil

import pandas as pd
from IPython.display import Image, display

from cmbfe import cli, config, study
from cmbfe.detect.lesion_metrics import compare_with_truth
from cmbfe.detect.report import html_pages
from cmbfe.dicom_write import write_dicom_series
from cmbfe.study import ship
from cmbfe.synth import lesion_table, mimic_table, synthesize_patient

cfg = config.load(profile)
pre = study.ensure_data(cfg)
model = ship.ensure_model(cfg, pre)
print(f"model: {model.relative_to(config.REPO_ROOT)}\n")
print((model / "README.md").read_text())

# %% [markdown]
# ## A held-out patient, written as a DICOM series, through `cmbfe detect`

# %%
assert patient_seed != cfg.synth.seed, "the held-out patient must come from another seed than the study's"
scfg = config.from_dict({"synth": {**cfg.to_dict()["synth"], "seed": patient_seed, "workers": 1}}).synth
vol = synthesize_patient(patient_index, scfg)
work = cfg.data_path() / "held_out"
shutil.rmtree(work, ignore_errors=True)
scan = work / f"seed{patient_seed}-{vol.patient_id}"
write_dicom_series(vol, scan / "dicom", uid_seed=f"held-out-{patient_seed}-{patient_index}")
print(f"{vol.patient_id} (seed {patient_seed}): {vol.shape[2]} x {vol.shape[1]} x {vol.shape[0]} voxels, "
      f"{len(vol.lesions)} CMBs, {len(vol.mimics)} mimics")
out = work / "report"
status = cli.main(["detect", str(scan), "--out", str(out), "--model", str(model), "--overwrite"])
assert status == 0
cmbs = pd.read_csv(out / "cmbs.csv")
cmbs.head(10)

# %% [markdown]
# ## The report (`report.pdf` / `report.html`): summary page and slice tiles

# %%
pages = html_pages(out / "report.html")
if cfg.profile == config.COMMITTED_PROFILE:
    cfg.figures_path().mkdir(parents=True, exist_ok=True)
    (cfg.figures_path() / "fig_detect_report.png").write_bytes(pages[0])
for png in pages[:n_pages]:
    display(Image(data=png, width=700))

# %% [markdown]
# ## The lesion list against the ground truth
#
# A true CMB is found when a detected lesion centre lies within max(3 mm, its radius) of it (3D, nearest
# first); other detected lesions are false positives, named after the mimic within reach (else `other`).

# %%
cmp = compare_with_truth(cmbs, lesion_table(vol), mimic_table(vol))
c = cmp["counts"]
fp_by_mimic = {f"FP on {k}": v for k, v in c["fp_by_mimic"].items()}
summary = pd.DataFrame([{"patient": vol.patient_id, "seed": patient_seed, "CMBs": c["cmbs"],
                         "found": c["hits"], "missed": c["misses"], "sensitivity": round(c["sensitivity"], 3),
                         "false positives": c["fp"], **fp_by_mimic}])
study.save_table(summary, cfg, "detect_held_out_patient",
                 caption=f"cmbfe detect on a held-out synthetic patient (seed {patient_seed}) with the "
                         f"shipped model at its default operating point; whole scan, every head slice searched.")
summary

# %% [markdown]
# ## VALDO's lesion metrics for this patient
#
# The VALDO 2021 protocol (task 2): detected and true CMB centres match one-to-one when they are closer
# than 5 mm (also shown: 3 mm); per-subject F1 = 2 TP / (2 TP + FP + FN), ranked by its median over
# subjects; also the absolute count difference. The held-out cohort's numbers (12 patients from a seed no
# run used, CMB-free ones among them, and what each false-positive lever buys) are written by
# `benchmarks/detect_held_out.py` to `results/detect_held_out.md`, shown below when present.

# %%
from cmbfe.detect.lesion_metrics import valdo_metrics

truth_mm = lesion_table(vol)[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
pred_mm = cmbs[["x_lps_mm", "y_lps_mm", "z_lps_mm"]].to_numpy(float)
valdo = pd.DataFrame([{k: v for k, v in valdo_metrics({vol.patient_id: (pred_mm, truth_mm)}, d).items()
                       if k != "subjects"} for d in (5.0, 3.0)])
valdo

# %%
held_out_md = config.REPO_ROOT / "results" / "detect_held_out.md"
print(held_out_md.read_text() if held_out_md.is_file() else "results/detect_held_out.md not written yet")

# %%
cmp["truth"][["lesion_id", "location", "diameter_mm", "hit", "lesion_id_detected", "distance_mm"]]

# %%
cmp["detections"][["lesion_id", "i", "j", "k", "diameter_mm", "max_score", "tp", "truth_id", "mimic"]]
