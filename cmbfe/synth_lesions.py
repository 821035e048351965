"""Synthetic patients, part 3: where the CMBs go, and the vessel mimics (used by :mod:`cmbfe.synth`).

:func:`place_cmbs` draws each patient's CMBs (count, lobar/deep location mix, true radius and susceptibility)
into parenchyma away from CSF, veins and each other; :func:`vein_dots` finds where visible veins cross a
slice nearly perpendicularly (dot-like mimics); calcifications are drawn at :data:`CALC_SITES`.
:class:`SynthLesion` carries the generator's truth. Positions are LPS mm.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from cmbfe.config import SynthConfig
from cmbfe.synth_anatomy import BRAINSTEM, Z_MARGIN, Geom, ellipsoid
from cmbfe.volume import Lesion

CALC_SITES = {"globus_pallidus": (19, -2, 0), "pineal": (0, -31, 4), "choroid_plexus": (28, -42, 14),
              "dentate": (15, -57, -34)}
LOBAR_SPLIT = {"lobar": 33, "subcortical_wm": 40}
DEEP_SPLIT = {"cerebellum": 8, "basal_ganglia": 8, "thalamus": 5, "brainstem": 4}


class SynthLesion(Lesion):
    """A Lesion with the generator's truth: haemosiderin/calcium radius and susceptibility."""

    def __init__(self, *args, radius_true_mm: float = float("nan"), dchi_ppm: float = float("nan"), **kw):
        super().__init__(*args, **kw)
        self.radius_true_mm, self.dchi_ppm = radius_true_mm, dchi_ppm


def place_cmbs(rng, cfg: SynthConfig, g: Geom, an: dict, veins: list[dict]) -> list[tuple]:
    """Draw CMBs: count (0 with p_no_cmb, else 1 + negative binomial), location mix, true radius
    (log-uniform) and dchi; centres in parenchyma away from CSF, veins and each other.
    Returns [(lps, a, dchi, location)]."""
    if rng.random() < cfg.p_no_cmb:
        return []
    m = max(cfg.cmb_mean - 1.0, 1e-3)
    k = cfg.cmb_dispersion
    n = min(1 + int(rng.negative_binomial(k, k / (k + m))), cfg.cmb_max)
    sub = (slice(Z_MARGIN + 2, Z_MARGIN + 2 * g.nsl - 2, 2), slice(None, None, 2), slice(None, None, 2))
    gm, wm, csf, dist, lab = (an[k][sub] for k in ("gm", "wm", "csf", "dist", "label"))
    mni = an["mni"][(slice(None),) + sub]
    bs = ellipsoid(mni, (slice(None),) * 3, *BRAINSTEM) > 0.5
    infra = (mni[2] < -20) & (mni[1] < -42) & ~bs
    par = (gm + wm > 0.85) & (csf < 0.1) & (dist < -3.0)
    supra = par & ~infra & ~bs & (lab == 0) & (mni[2] > -25)
    masks = {"lobar": supra & (gm > 0.35) & (wm > 0.2), "subcortical_wm": supra & (wm > 0.85) & (dist < -8.0),
             "basal_ganglia": par & (lab >= 1) & (lab <= 3), "thalamus": par & (lab == 4),  # NUCLEI codes
             "cerebellum": par & infra, "brainstem": par & bs & (dist < -4.0)}
    names = list(LOBAR_SPLIT) + list(DEEP_SPLIT)
    p = np.array([cfg.p_lobar * v / sum(LOBAR_SPLIT.values()) for v in LOBAR_SPLIT.values()]
                 + [(1 - cfg.p_lobar) * v / sum(DEEP_SPLIT.values()) for v in DEEP_SPLIT.values()])
    locs = rng.choice(len(names), n, p=p / p.sum())
    cand = {k: np.flatnonzero(v) for k, v in masks.items()}
    fallback = np.flatnonzero(par)
    vp = np.concatenate([v["pts"] for v in veins]) if veins else np.zeros((1, 3)) + 1e6
    vr = np.concatenate([np.full(len(v["pts"]), v["radius"]) for v in veins]) if veins else np.zeros(1)
    tree, out = cKDTree(vp), []
    lo, hi = np.log(cfg.cmb_radius_mm[0]), np.log(cfg.cmb_radius_mm[1])
    for li in locs:
        a, dchi = float(np.exp(rng.uniform(lo, hi))), float(rng.uniform(*cfg.cmb_dchi_ppm))
        idx = cand[names[li]] if len(cand[names[li]]) else fallback
        if not len(idx):
            break
        for _ in range(40):
            z, y, x = np.unravel_index(int(rng.choice(idx)), gm.shape)
            v = np.array([2 * x, 2 * y, 2 * z + Z_MARGIN + 2], float) + rng.uniform(-1, 1, 3)
            pt = g.sim_to_lps(v)
            dv, iv = tree.query(pt)
            if dv - vr[iv] < a + 2.5:
                continue
            if all(np.linalg.norm(pt - q) >= 2 * (a + b) + 4.0 for q, b, _, _ in out):
                out.append((pt, a, dchi, names[li]))
                break
    return out


def vein_dots(g: Geom, veins: list[dict]) -> list[tuple]:
    """Where a vein (radius >= 0.45 mm, visible) crosses a slice centre within 30 deg of the normal."""
    z0, out = g.affine[2, 3], []
    for v in veins:
        p = v["pts"]
        if v["radius"] < 0.45 or len(p) < 5:
            continue
        d = np.zeros_like(p)
        d[2:-2] = p[4:] - p[:-4]
        cos = np.abs(d[:, 2]) / np.maximum(np.linalg.norm(d, axis=1), 1e-9)
        za, zb = p[:-1, 2], p[1:, 2]
        k = np.ceil((np.minimum(za, zb) - z0) / g.dz).astype(int)
        zk = z0 + k * g.dz
        hit = (zk <= np.maximum(za, zb)) & (za != zb) & (k >= 0) & (k < g.nsl)
        hit &= cos[:-1] >= np.cos(np.pi / 6)
        seen = set()
        for s in np.flatnonzero(hit):
            if k[s] not in seen:
                seen.add(k[s])
                t = (zk[s] - za[s]) / (zb[s] - za[s])
                out.append(("vein", v["kind"], p[s] + t * (p[s + 1] - p[s]), 2 * v["radius"] + g.px))
    return out
