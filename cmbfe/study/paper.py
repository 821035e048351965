"""The paper's published numbers (Li et al. 2021, private data), in one place.

Every table cmbfe writes puts this run's numbers beside these, in columns labelled
"paper, private data"; nothing here is ever presented as a result of this run.
"""

from __future__ import annotations

LABEL = "paper, private data"

# Table 1: patients / slices with CMBs / CMBs (per-slice boxes) per split.
TABLE1 = {"train": (33, 467, 845), "val": (8, 89, 133), "test": (17, 167, 323)}

# Table 2: VOC AP on the test set.
TABLE2_AP = {(300, False): 0.482, (300, True): 0.502, (512, False): 0.733, (512, True): 0.756}
# the paper's FE gain for SSD-512 (one run each, no interval)
TABLE2_FE_GAIN = round(TABLE2_AP[(512, True)] - TABLE2_AP[(512, False)], 3)

# Table 3: per backbone and input size, precision at 90 % recall and training seconds per batch of 8
# (without FE, with FE), on the paper's GPU.
TABLE3 = {
    "vgg16:512": {"precision": (0.764, 0.797), "s_per_batch": (0.343, 0.430)},
    "mobilenet:320": {"precision": (0.428, 0.502), "s_per_batch": (0.138, 0.181)},
    "resnet34:300": {"precision": (0.703, 0.731), "s_per_batch": (0.129, 0.159)},
}

# Table 4: sensitivity, precision, FP per CMB, as published (the comparators are quoted, not rerun).
TABLE4 = [
    {"method": "SSD-512 (Li et al. 2021)", "sensitivity": 0.90, "precision": 0.764, "fp_per_cmb": 0.31},
    {"method": "SSD-512-FE (Li et al. 2021)", "sensitivity": 0.90, "precision": 0.797, "fp_per_cmb": 0.23},
    {"method": "Liu et al. 2019 (as quoted by Li et al.)", "sensitivity": 0.958, "precision": 0.709,
     "fp_per_cmb": 0.39},
]

# Section 3: 10-fold cross-validation, mean AP.
CV_MEAN_AP = {False: 0.73, True: 0.75}
