"""Patient bootstrap, paired bootstrap and seed aggregation (cmbfe.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from cmbfe import metrics as M
from cmbfe import stats
from cmbfe.evaluate import dets_from_coco, gt_from_coco


def cohort(n_patients: int, seed: int = 0, slices: int = 4, quality: float = 0.8):
    """COCO-like dicts: each patient has ``slices`` slices with 0-2 CMBs; detections hit CMBs with
    probability ``quality`` (higher score when hit) plus random FPs. Scores are continuous."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for p in range(n_patients):
        for s in range(slices):
            iid = len(images) + 1
            images.append({"id": iid, "patient_id": f"P{p:03d}", "slice_index": s, "pixel_spacing_mm": [0.5, 0.5]})
            for _ in range(int(rng.integers(0, 3))):
                x, y = rng.uniform(0, 200, 2)
                anns.append({"id": len(anns) + 1, "image_id": iid, "bbox": [x, y, 8.0, 8.0]})
                if rng.random() < quality:
                    dets.append({"image_id": iid, "bbox": [x + rng.normal(0, 0.5), y, 8.0, 8.0],
                                 "score": float(rng.beta(4, 2))})
            for _ in range(int(rng.integers(0, 3))):
                dets.append({"image_id": iid, "bbox": [*rng.uniform(220, 400, 2).tolist(), 8.0, 8.0],
                             "score": float(rng.beta(2, 4))})
    gt_obj = {"images": images, "annotations": anns}
    g = gt_from_coco(gt_obj)
    d = dets_from_coco(dets, g)
    return gt_obj, dets, g, d


def prepared(n_patients: int, seed: int = 0, quality: float = 0.8):
    _, _, g, d = cohort(n_patients, seed, quality=quality)
    return stats.prepare(g, d, M.match(g, d))


def test_point_estimate_matches_metrics():
    _, _, g, d = cohort(15)
    m = M.match(g, d)
    out, _ = M.summarise(g, d, m)
    res = stats.bootstrap_ci(stats.prepare(g, d, m), n=20, seed=0)
    assert res["ap_voc"]["estimate"] == pytest.approx(out["ap_voc"], abs=1e-12)
    assert res["precision_at_sensitivity_0.9"]["estimate"] == out["precision_at_sensitivity_0.9"]
    assert res["froc_mean"]["estimate"] == out["froc_mean"]


@pytest.mark.parametrize("counts", [[2, 0, 1, 3, 0, 0, 1, 1], [0, 0, 0, 8, 0, 0, 0, 0], [1] * 8])
def test_resample_equals_concatenated_patients(counts):
    """Reweighting = building the resampled test set explicitly and re-matching it."""
    gt_obj, dets, g, d = cohort(8, seed=3)
    data = stats.prepare(g, d, M.match(g, d))
    counts = np.array(counts)
    est = stats.weighted_stats(data, counts)[0]
    # explicit concatenation: copy c of patient p gets new image ids and patient id
    images, anns, dres = [], [], []
    for p, c in enumerate(counts):
        pid = f"P{p:03d}"
        for copy in range(c):
            old = {im["id"] for im in gt_obj["images"] if im["patient_id"] == pid}
            new = {i: 100000 * (copy + 1) + i for i in old}
            images += [{**im, "id": new[im["id"]], "patient_id": f"{pid}-{copy}"} for im in gt_obj["images"]
                       if im["id"] in old]
            anns += [{**a, "image_id": new[a["image_id"]]} for a in gt_obj["annotations"] if a["image_id"] in old]
            dres += [{**x, "image_id": new[x["image_id"]]} for x in dets if x["image_id"] in old]
    g2 = gt_from_coco({"images": images, "annotations": anns})
    d2 = dets_from_coco(dres, g2)
    out, _ = M.summarise(g2, d2, M.match(g2, d2))
    assert est["ap_voc"] == pytest.approx(out["ap_voc"], abs=1e-12)
    assert est["precision_at_sensitivity"] == pytest.approx(out["precision_at_sensitivity_0.9"], abs=1e-12)
    assert est["froc_mean"] == pytest.approx(out["froc_mean"], abs=1e-12)


def test_ci_contains_estimate_and_is_seeded():
    data = prepared(30)
    a = stats.bootstrap_ci(data, n=300, seed=1)
    for k in ("ap_voc", "precision_at_sensitivity_0.9", "froc_mean"):
        assert a[k]["lo"] <= a[k]["estimate"] <= a[k]["hi"]
        assert a[k]["n_valid"] == 300
    assert stats.bootstrap_ci(data, n=300, seed=1) == a
    assert stats.bootstrap_ci(data, n=300, seed=2)["ap_voc"]["lo"] != a["ap_voc"]["lo"]


def test_ci_narrows_with_more_patients():
    small = stats.bootstrap_ci(prepared(15, seed=5), n=300, seed=0)
    large = stats.bootstrap_ci(prepared(240, seed=5), n=300, seed=0)
    for k in ("ap_voc", "froc_mean"):
        assert large[k]["hi"] - large[k]["lo"] < 0.6 * (small[k]["hi"] - small[k]["lo"])


def test_paired_bootstrap():
    _, _, g, d = cohort(40, seed=7)
    a = stats.prepare(g, d, M.match(g, d))
    same = stats.paired_bootstrap(a, a, n=200, seed=0)
    assert same["ap_voc"]["diff"] == 0.0 and same["ap_voc"]["p"] == 1.0
    # run b: the same detector with scores scrambled -> clearly worse
    rng = np.random.default_rng(0)
    d_bad = M.Detections(boxes=d.boxes, image=d.image, scores=rng.permutation(d.scores))
    b = stats.prepare(g, d_bad, M.match(g, d_bad))
    res = stats.paired_bootstrap(a, b, n=300, seed=0)
    r = res["ap_voc"]
    assert r["diff"] > 0 and r["lo"] > 0 and r["p"] < 0.05 and r["lo"] <= r["diff"] <= r["hi"]
    rev = stats.paired_bootstrap(b, a, n=300, seed=0)["ap_voc"]
    assert rev["diff"] == pytest.approx(-r["diff"]) and rev["p"] == pytest.approx(r["p"])
    with pytest.raises(ValueError):
        stats.paired_bootstrap(a, prepared(10), n=5)


def test_bands():
    data = prepared(20)
    bands = stats.bootstrap_bands(data, n=50, seed=0)
    assert bands["precision_lo"].shape == bands["recall"].shape == (101,)
    assert np.all(bands["precision_lo"] <= bands["precision_hi"])
    assert np.all(bands["sensitivity_lo"] <= bands["sensitivity_hi"])
    assert np.all(np.diff(bands["sensitivity_hi"]) >= 0)


def test_combine_seeds():
    r = stats.combine_seeds([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["sd"] == 1.0 and r["n"] == 3
    assert r["hi"] - r["mean"] == pytest.approx(4.302652729911275 / np.sqrt(3))
    one = stats.combine_seeds([0.5, float("nan")])
    assert one["mean"] == 0.5 and one["n"] == 1 and np.isnan(one["lo"])
    assert stats.combine_seeds([])["n"] == 0


def test_no_detections_and_no_gt():
    _, _, g, _ = cohort(5)
    empty = M.Detections(boxes=np.zeros((0, 4)), image=np.zeros(0, int), scores=np.zeros(0))
    res = stats.bootstrap_ci(stats.prepare(g, empty, M.match(g, empty)), n=20)
    assert res["ap_voc"] == {"estimate": 0.0, "lo": 0.0, "hi": 0.0, "se": 0.0, "n_valid": 20}
