"""Hand-computed cases for cmbfe.metrics and a randomised cross-check against pycocotools COCOeval."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmbfe import metrics as M
from cmbfe.evaluate import dets_from_coco, gt_from_coco


def make(gt: dict[int, list], dets: list[tuple], patients: dict[int, str] | None = None,
         slices: dict[int, int] | None = None, spacing=(1.0, 1.0), lesions: dict | None = None):
    """gt: {image_id: [xywh, ...]}; dets: [(image_id, xywh, score)]; returns (GroundTruth, Detections)."""
    images = [{"id": i, "patient_id": (patients or {}).get(i, "P1"), "slice_index": (slices or {}).get(i, i),
               "pixel_spacing_mm": list(spacing)} for i in gt]
    anns = []
    for i, boxes in gt.items():
        for b in boxes:
            a = {"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": list(b)}
            if lesions is not None:
                a["lesion_id"] = lesions[len(anns)]
            anns.append(a)
    g = gt_from_coco({"images": images, "annotations": anns})
    d = dets_from_coco([{"image_id": i, "bbox": list(b), "score": s} for i, b, s in dets], g)
    return g, d


def run(g, d, **kw):
    m = M.match(g, d, **kw)
    return m, M.summarise(g, d, m)[0]


A, B = [0, 0, 10, 10], [50, 50, 10, 10]
FAR = [200, 200, 10, 10]


def test_iou_continuous_no_plus_one():
    # [0,2]x[0,2] vs [1,3]x[0,2]: inter 2, union 6 -> 1/3 (a "+1" rule would give 6/12 = 0.5)
    assert M.iou_pairs(np.array([[0, 0, 2, 2.0]]), np.array([[1, 0, 3, 2.0]]))[0] == pytest.approx(1 / 3)
    assert M.iou_pairs(np.array([[0, 0, 0, 0.0]]), np.array([[0, 0, 0, 0.0]]))[0] == 0.0
    np.testing.assert_array_equal(M.xywh_to_xyxy([[1, 2, 3, 4]]), [[1, 2, 4, 6]])


def test_iou_threshold_inclusive():
    g, d = make({1: [[0, 0, 10, 10]]}, [(1, [0, 0, 5, 10], 0.9)])  # IoU exactly 0.5
    m, _ = run(g, d)
    assert m.tp.tolist() == [True]
    m2 = M.match(g, d, iou=0.51)
    assert m2.tp.tolist() == [False]


def test_ties_in_score_keep_input_order():
    # d0 (0.9, hits A), d1 (0.9, FP), d2 (0.5, hits B): tp = [1, 0, 1]
    g, d = make({1: [A, B]}, [(1, A, 0.9), (1, FAR, 0.9), (1, B, 0.5)])
    m, out = run(g, d)
    assert m.order.tolist() == [0, 1, 2]
    assert out["ap_voc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert out["ap_voc07"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert out["ap_coco101"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-9)
    # same scores, FP listed first -> AP changes (documented tie rule) but operating points do not
    g2, d2 = make({1: [A, B]}, [(1, FAR, 0.9), (1, A, 0.9), (1, B, 0.5)])
    _, out2 = run(g2, d2)
    assert out2["ap_voc"] == pytest.approx(2 / 3)
    for key in ("precision_at_sensitivity_0.9", "fp_per_cmb", "froc_mean", "f1_best"):
        assert out[key] == out2[key]
    assert out["precision_at_sensitivity_0.9"] == pytest.approx(2 / 3)
    assert out["fp_per_cmb"] == pytest.approx(0.5)
    assert out["threshold_at_sensitivity_0.9"] == 0.5
    assert out["f1_best"] == pytest.approx(0.8)
    assert (out["tp"], out["fp"], out["sensitivity"], out["precision"]) == (2, 1, 1.0, pytest.approx(2 / 3))
    c = M.curve(d.scores[m.order], m.tp[m.order], 2, 1, 1)  # tied detections never split
    assert c.tp.tolist() == [1, 2] and c.fp.tolist() == [1, 1]


def test_no_detections():
    g, d = make({1: [A], 2: []}, [])
    _, out = run(g, d)
    assert out["ap_voc"] == out["ap_voc07"] == out["ap_coco101"] == 0.0
    assert out["sensitivity"] == 0.0 and np.isnan(out["precision"])
    assert out["precision_at_sensitivity_0.9"] == 0.0 and out["fp_per_cmb"] is None
    assert out["froc_mean"] == 0.0 and out["f1_best"] == 0.0
    assert out["lesion_sensitivity"] == 0.0 and out["lesion_fp_per_scan"] == 0.0
    assert out["lesion_at"] == "all"


def test_no_gt():
    g, d = make({1: [], 2: []}, [(1, A, 0.3), (2, B, 0.2)])
    _, out = run(g, d)
    assert np.isnan(out["ap_voc"]) and np.isnan(out["sensitivity"]) and np.isnan(out["froc_mean"])
    assert out["precision"] == 0.0 and out["fp"] == 2 and out["fp_per_cmb"] is None
    assert np.isnan(out["lesion_sensitivity"]) and out["lesion_fp_per_scan"] == 2.0


def test_all_false_positives():
    g, d = make({1: [A], 2: []}, [(1, FAR, 0.9), (2, A, 0.8), (1, [30, 30, 4, 4], 0.7)])
    _, out = run(g, d)
    assert out["ap_voc"] == out["ap_voc07"] == out["ap_coco101"] == 0.0
    assert out["tp"] == 0 and out["fp"] == 3 and out["precision"] == 0.0
    assert out["froc"]["8"] == 0.0 and out["f1_best_threshold"] is None


def test_duplicates_are_false_positives():
    g, d = make({1: [A]}, [(1, A, 0.7), (1, [1, 0, 10, 10], 0.9), (1, [0, 1, 10, 10], 0.8)])
    m, out = run(g, d)
    assert m.tp.tolist() == [False, True, False]
    assert out["ap_voc"] == 1.0 and out["precision"] == pytest.approx(1 / 3)
    assert out["precision_at_sensitivity_0.9"] == 1.0 and out["fp_per_cmb"] == 0.0


def test_best_unmatched_gt_not_first():
    # det 0 overlaps G0 (IoU 0.6) and G1 (IoU ~0.82): takes G1 (pycocotools rule), so det 1 can take G0
    g0, g1 = [0, 0, 10, 10], [4, 0, 10, 10]
    g, d = make({1: [g0, g1]}, [(1, [3, 0, 10, 10], 0.9), (1, [0, 0, 10, 10], 0.8)])
    m, _ = run(g, d)
    assert m.gt_of_det.tolist() == [1, 0]
    # equal IoU: ties go to the later GT (as pycocotools)
    g, d = make({1: [[0, 0, 10, 10], [4, 0, 10, 10]]}, [(1, [2, 0, 10, 10], 0.9)])
    assert M.match(g, d).gt_of_det.tolist() == [1]


def test_centre_rule_uses_spacing():
    # pixel spacing dy=1.0 mm, dx=0.5 mm; GT centre (12, 12)
    g, d = make({1: [[10, 10, 4, 4]]}, [(1, [14, 10, 4, 4], 0.9)], spacing=(1.0, 0.5))
    assert M.match(g, d, rule="centre", radius_mm=2.5).tp.tolist() == [True]  # 4 px * 0.5 = 2 mm
    assert M.match(g, d, rule="iou").tp.tolist() == [False]  # IoU 0
    g, d = make({1: [[10, 10, 4, 4]]}, [(1, [10, 13, 4, 4], 0.9)], spacing=(1.0, 0.5))
    assert M.match(g, d, rule="centre", radius_mm=2.5).tp.tolist() == [False]  # 3 px * 1.0 = 3 mm
    assert M.match(g, d, rule="centre", radius_mm=3.0).tp.tolist() == [True]  # boundary inclusive
    # the nearest unmatched GT is taken
    g, d = make({1: [[0, 0, 4, 4], [3, 0, 4, 4]]}, [(1, [2, 0, 4, 4], 0.9), (1, [0, 0, 4, 4], 0.5)])
    assert M.match(g, d, rule="centre", radius_mm=2.0).gt_of_det.tolist() == [1, 0]


def test_recall_by_size():
    # GT longer sides 2, 5 and 8 mm (spacing 1 mm): bins [0,2) [2,3) [3,4) [4,6) [6,inf)
    g, d = make({1: [[10, 10, 2, 2], [41, 41, 5, 5], [70, 70, 8, 8]]},
                [(1, [10, 10, 2, 2], 0.9), (1, [42, 42, 6, 6], 0.8)])
    r = M.recall_by_size(g, M.match(g, d, rule="iou"))
    assert r["n"].tolist() == [0, 1, 0, 1, 1]
    assert np.isnan(r["recall"][0]) and np.isnan(r["recall"][2])
    assert r["recall"][[1, 3, 4]].tolist() == [1.0, 0.0, 0.0]  # the 5 mm box: IoU 16/45 < 0.5
    m = M.match(g, d, rule="centre", radius_mm=2.5)
    assert M.recall_by_size(g, m)["recall"][[1, 3, 4]].tolist() == [1.0, 1.0, 0.0]
    keep = d.scores >= 0.85  # only the 0.9 detection
    assert M.recall_by_size(g, m, keep=keep)["recall"][[1, 3]].tolist() == [1.0, 0.0]
    # spacing scales the size: at 0.5 mm pixels the 5 px box is 2.5 mm
    g2, d2 = make({1: [[41, 41, 5, 5]]}, [], spacing=(0.5, 0.5))
    assert M.recall_by_size(g2, M.match(g2, d2))["n"].tolist() == [0, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="increasing"):
        M.recall_by_size(g, m, bins_mm=(2.0, 1.0))


def test_froc_hand_computed():
    tp = np.array([1, 0, 1, 0, 0, 1], bool)
    c = M.curve(np.linspace(1, 0.1, 6), tp, n_gt=4, n_scans=2, n_slices=10)
    np.testing.assert_allclose(M.froc(c), [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75])
    np.testing.assert_allclose(M.froc(c, per="slice", fps=(0.1, 0.3)), [0.5, 0.75])
    assert M.froc(c, fps=(0.0,))[0] == 0.25  # the first detection is a TP at 0 FP


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=0, max_size=40),
       st.integers(1, 30), st.integers(1, 5))
def test_froc_monotone_and_ap_bounds(dets, extra_gt, n_scans):
    tp = np.array([t for t, _ in dets], bool)
    scores = np.sort(np.array([s for _, s in dets], float))[::-1]
    n_gt = int(tp.sum()) + extra_gt
    c = M.curve(scores, tp, n_gt, n_scans, 10)
    fps = tuple(np.geomspace(1 / 16, 16, 40))
    f = M.froc(c, fps)
    assert np.all(np.diff(f) >= 0) and np.all((f >= 0) & (f <= 1))
    for fn in (M.ap_voc, M.ap_voc07, M.ap_coco101):
        assert 0.0 <= fn(tp, n_gt) <= 1.0
    if tp.all() and extra_gt == 0 and len(tp):
        assert M.ap_voc(tp, n_gt) == 1.0


def test_lesions_link_adjacent_slices():
    # patient P1 slices 0..5 (image id = slice); lesion L1 on slices 1-2, lesion L2 on slice 3 (elsewhere)
    L, L2 = [20, 20, 6, 6], [80, 80, 6, 6]
    gt = {0: [], 1: [L], 2: [L], 3: [L2], 4: [], 5: []}
    dets = [(1, L, 0.9), (2, L, 0.8), (3, [22, 22, 6, 6], 0.7),  # TP, TP, FP linked to them
            (0, [150, 150, 6, 6], 0.6),  # isolated FP
            (5, [22, 22, 6, 6], 0.5)]  # slice 5: gap at slice 4, not linked -> FP 3D detection
    g, d = make(gt, dets, lesions={0: "L1", 1: "L1", 2: "L2"})
    assert g.n_lesions == 2
    labels, n = M.link_detections(g, d, np.ones(5, bool))
    assert n == 3 and labels[0] == labels[1] == labels[2] and len({labels[3], labels[4], labels[0]}) == 3
    m = M.match(g, d)
    les = M.lesion_metrics(g, d, m, None)
    assert les["lesion_sensitivity"] == 0.5 and les["lesion_fp"] == 2 and les["lesion_fp_per_scan"] == 2.0
    les = M.lesion_metrics(g, d, m, 0.65)  # drops the two low-score FPs
    assert les["n_3d_detections"] == 1 and les["lesion_fp"] == 0
    # different patients with the same slice indices never link
    g, d = make({1: [], 2: []}, [(1, L, 0.9), (2, L, 0.8)], patients={1: "P1", 2: "P2"}, slices={1: 3, 2: 4})
    assert M.link_detections(g, d, np.ones(2, bool))[1] == 2


def test_lesion_id_missing_means_one_lesion_per_box():
    g, _ = make({1: [A], 2: [A]}, [])
    assert g.n_lesions == 2


def test_attribute_fps():
    g, d = make({1: [A], 2: []}, [(1, A, 0.9), (1, [100, 100, 10, 10], 0.8), (2, [40, 40, 4, 4], 0.7),
                                  (2, [0, 0, 2, 2], 0.6), (2, [120, 0, 4, 4], 0.5)])
    objs = M.SliceObjects(image=np.array([0, 1, 1, 1]), kind=np.array(["vein", "calcification", "air", "tumour"]),
                          boxes=np.array([[105, 105, 130, 130], [41, 41, 43, 43], [0, 0, 1.5, 1.5],
                                          [119, 0, 125, 2]], float))
    m = M.match(g, d)
    counts = M.attribute_fps(d, ~m.tp, objs)
    assert counts == {"vein": 1, "calcification": 1, "iron": 0, "air": 1, "cmb": 0, "other": 1}
    assert sum(counts.values()) == int((~m.tp).sum())
    assert M.attribute_fps(d, ~m.tp & (d.scores >= 0.75), objs)["vein"] == 1


def test_summary_keys():
    g, d = make({1: [A], 2: [B]}, [(1, A, 0.9), (2, FAR, 0.8)], patients={1: "P1", 2: "P2"})
    _, out = run(g, d)
    need = {"ap_voc", "ap_voc07", "ap_coco101", "sensitivity", "precision", "precision_at_sensitivity_0.9",
            "fp_per_cmb", "f1_best", "froc", "froc_mean", "lesion_sensitivity", "lesion_fp_per_scan", "n_gt",
            "n_dets", "n_images", "n_patients", "tp", "fp"}
    assert need <= set(out)
    assert list(out["froc"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    assert out["n_patients"] == 2 and out["precision_at_sensitivity_0.9"] == 0.0  # 0.5 sensitivity only


# ---------------------------------------------------------------- pycocotools cross-check


def _random_case(rng: np.random.Generator):
    n_img = int(rng.integers(1, 12))
    gt, dets = {}, []
    for i in range(1, n_img + 1):
        k = int(rng.integers(0, 5))
        xy = rng.uniform(0, 30, (k, 2))  # crowded: boxes often overlap several GT
        wh = rng.uniform(3, 15, (k, 2))
        gt[i] = [list(map(float, b)) for b in np.column_stack([xy, wh])]
        for b in gt[i]:
            for _ in range(int(rng.integers(0, 3))):
                dets.append((i, list(np.asarray(b) + rng.normal(0, 2, 4) * [1, 1, 0.5, 0.5]), 0))
        for _ in range(int(rng.integers(0, 4))):
            dets.append((i, [*rng.uniform(0, 30, 2), *rng.uniform(3, 15, 2)], 0))
    scores = rng.permutation(len(dets)) / max(len(dets), 1) + 0.01  # unique scores
    dets = [(i, [b[0], b[1], abs(b[2]), abs(b[3])], float(s)) for (i, b, _), s in zip(dets, scores)]
    return gt, dets


@pytest.mark.parametrize("seed", range(80))
def test_matches_pycocotools(seed):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(seed)
    gt, dets = _random_case(rng)
    if sum(len(v) for v in gt.values()) == 0 or not dets:
        gt.setdefault(1, []).append([5.0, 5.0, 8.0, 8.0])
        dets.append((1, [5.5, 5.0, 8.0, 8.0], 0.005))
    g, d = make(gt, dets)
    m = M.match(g, d)
    ours = M.ap_coco101(m.tp[m.order], g.n_gt)

    anns, k = [], 0
    for i, boxes in gt.items():
        for b in boxes:
            k += 1
            anns.append({"id": k, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0})
    coco_gt = COCO()
    coco_gt.dataset = {"images": [{"id": i} for i in gt], "annotations": anns,
                       "categories": [{"id": 1, "name": "cmb"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{"image_id": i, "category_id": 1, "bbox": b, "score": s} for i, b, s in dets])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.params.maxDets = [1000]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    ref = float(np.mean(ev.eval["precision"][0, :, 0, 0, 0]))
    assert ours == pytest.approx(ref, abs=1e-12)
    # per-detection TP flags agree too (result ids are 1..n in input order)
    tp_ref = np.zeros(len(dets), bool)
    for e in ev.evalImgs:
        if e is not None:
            tp_ref[np.array(e["dtIds"], int) - 1] = e["dtMatches"][0] > 0
    np.testing.assert_array_equal(m.tp, tp_ref)


def _voc_eval_reference(tp, n_gt, use_07):
    """The widely used py-faster-rcnn ``voc_ap`` (loops kept as in the original)."""
    tp = np.asarray(tp, float)
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    rec, prec = ctp / n_gt, ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    if use_07:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            ap += (0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])) / 11.0
        return ap
    mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def test_voc_ap_matches_reference_implementation():
    rng = np.random.default_rng(0)
    for _ in range(500):
        tp = rng.random(int(rng.integers(1, 40))) < 0.5
        n_gt = max(int(rng.integers(1, 30)), int(tp.sum()))
        assert M.ap_voc(tp, n_gt) == pytest.approx(_voc_eval_reference(tp, n_gt, False), abs=1e-12)
        assert M.ap_voc07(tp, n_gt) == pytest.approx(_voc_eval_reference(tp, n_gt, True), abs=1e-12)


def test_lesion_sensitivity_against_every_true_cmb():
    L, L2 = [20, 20, 6, 6], [80, 80, 6, 6]
    g, d = make({1: [L], 2: [L], 3: [L2]}, [(1, L, 0.9), (3, [150, 150, 6, 6], 0.8)],
                lesions={0: "L1", 1: "L1", 2: "L2"})
    m = M.match(g, d)
    assert M.lesion_metrics(g, d, m, None)["lesion_sensitivity"] == 0.5  # 1 of the 2 boxed lesions
    r = M.lesion_sensitivity_all(g, d, m, None, n_true=4)  # 2 more true CMBs the label model left unboxed
    assert r == {"lesion_sensitivity_all": 0.25, "lesion_tp": 1, "n_true_cmbs": 4, "n_unboxed": 2}
    assert M.lesion_sensitivity_all(g, d, m, 0.95, n_true=2)["lesion_sensitivity_all"] == 0.0
    with pytest.raises(ValueError, match="boxed lesions"):
        M.lesion_sensitivity_all(g, d, m, None, n_true=1)


def test_nested_boxes_on_one_slice_are_one_lesion():
    # issue 20, defect 1: a small box nested in a larger one on the same slice (IoU under the NMS limit)
    # is one focus; a separate box on that slice stays its own lesion
    g, d = make({1: [], 2: []}, [(1, [40, 40, 12, 12], 0.9), (1, [44, 44, 3, 3], 0.5), (1, [150, 150, 6, 6], 0.4),
                                 (2, [41, 41, 10, 10], 0.8)])
    labels, n = M.link_detections(g, d, np.ones(4, bool))
    assert n == 2 and labels[0] == labels[1] == labels[3] != labels[2]
    # a kept box and a dropped box nested in it: the dropped one gets no label
    labels, n = M.link_detections(g, d, np.array([True, False, True, True]))
    assert n == 2 and labels[1] == -1
