"""Synthetic SWI cohort: a physics-based generator (recipe Tier B, simplified for speed).

Per patient: the nilearn MNI152 template (GM/WM/T1, bundled, offline) is warped by a random affine +
smooth deformation onto a simulation grid (output in-plane pixels, at most 256 across, slice_mm/2
sub-slices, cropped to the head); a head shell (CSF, dark skull, scalp) surrounds the brain. A chi map
(tissues, iron in deep nuclei, venous tubes, sinus/mastoid air) gives the field by an FFT dipole
kernel; the GRE signal has T2* decay, intravoxel dephasing and phase. Complex sub-slices are averaged
to the slices; CMBs and calcifications are sub-voxel spheres with the analytic dipole field evaluated
in local supersampled patches on the output grid (blooming). Then bias field, complex Gaussian noise
(Rician magnitude), SWI phase mask (homodyne high-pass, f^4) and scaling to integers 0..4095.
Everything is deterministic from ``(cfg.seed, index)``.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import fft as sfft
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from cmbfe.config import SynthConfig, load
from cmbfe.errors import InputError
from cmbfe.io import write_dicom_series
from cmbfe.utils import atomic_path
from cmbfe.volume import Lesion, Volume, volume_slice_boxes

GAMMA_MHZ_T = 42.577478
FOV_CENTRE_LPS = (0.0, 17.0)  # in-plane centre of the FOV (MNI y = -17 mm)
SIM_MAX = 256  # the physics grid has at most this many pixels across the FOV
X_HALF = 104.0  # the simulation grid is cropped to |x| <= X_HALF mm (the head)
TEMPLATE_VERSION = 2  # bump when _make_template changes (disk cache key)
Z_MARGIN = 4  # extra sub-slices simulated above and below the slab
FLIP = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS
# deep nuclei (MNI RAS centre of the right one, semi-axes mm, chi ppm, R2* 1/s); all bilateral
NUCLEI = {
    "putamen": ((25, 3, 2), (5.5, 13, 8), 0.038, 30.0),
    "globus_pallidus": ((19, -2, 0), (4.5, 9, 5.5), 0.131, 40.0),
    "caudate": ((13, 12, 10), (4.5, 8, 7), 0.044, 25.0),
    "thalamus": ((11, -18, 7), (7, 11, 7), 0.020, 21.0),
    "red_nucleus": ((5, -19, -8), (2.5, 3, 3), 0.100, 38.0),
    "substantia_nigra": ((11, -17, -12), (3, 6, 2.5), 0.111, 38.0),
    "dentate": ((15, -57, -34), (6, 8, 5), 0.152, 35.0),
}
# air (MNI RAS centre, semi-axes mm, chi ppm); mastoids bilateral; kept >= 4 mm outside the intracranial mask
AIR = {"frontal_sinus": ((0, 76, 4), (13, 8, 11), 9.2), "sphenoid_sinus": ((0, 18, -44), (9, 10, 7), 9.2),
       "ethmoid": ((0, 42, -30), (9, 13, 9), 9.2), "mastoid": ((50, -32, -48), (8, 11, 8), 4.0)}
CALC_SITES = {"globus_pallidus": (19, -2, 0), "pineal": (0, -31, 4), "choroid_plexus": (28, -42, 14),
              "dentate": (15, -57, -34)}
BRAINSTEM = ((0, -27, -30), (12, 14, 22))
LOBAR_SPLIT = {"lobar": 33, "subcortical_wm": 40}
DEEP_SPLIT = {"cerebellum": 8, "basal_ganglia": 8, "thalamus": 5, "brainstem": 4}
# large veins (MNI RAS polylines, radius mm); the superior sagittal sinus is traced from the template
BIG_VEINS = {
    "internal_cerebral": ([(2, 2, 17), (2, -18, 16), (1, -38, 8), (0, -46, 4)], 1.3),
    "straight_sinus": ([(0, -46, 4), (0, -70, 0), (0, -96, -4)], 2.2),
    "transverse_sinus": ([(0, -100, -6), (28, -98, -10), (48, -78, -22), (55, -52, -36), (46, -34, -52)],
                         3.0),
}


class SynthLesion(Lesion):
    """A Lesion with the generator's truth: haemosiderin/calcium radius and susceptibility."""

    def __init__(self, *args, radius_true_mm: float = float("nan"), dchi_ppm: float = float("nan"), **kw):
        super().__init__(*args, **kw)
        self.radius_true_mm, self.dchi_ppm = radius_true_mm, dchi_ppm


def _cache_file() -> Path:
    root = Path(os.environ.get("CMBFE_CACHE", Path.home() / ".cache" / "cmbfe"))
    return root / f"synth_template_{TEMPLATE_VERSION}.npz"


@functools.lru_cache(maxsize=1)
def _template() -> dict:
    """Template channels, computed once and kept in a disk cache (``$CMBFE_CACHE`` or ~/.cache/cmbfe)."""
    f = _cache_file()
    try:
        with np.load(f) as z:
            return {"stack": z["stack"].astype(np.float32), "affine": z["affine"], "sss": z["sss"]}
    except (OSError, KeyError, ValueError):
        pass
    tpl = _make_template()
    tpl["stack"] = tpl["stack"].astype(np.float16)  # as stored: same results with a cold or a warm cache
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, stack=tpl["stack"], affine=tpl["affine"], sss=tpl["sss"])
        os.replace(tmp, f)
    except OSError:
        pass
    return {**tpl, "stack": tpl["stack"].astype(np.float32)}


def _make_template() -> dict:
    """MNI152 channels (GM, WM, smoothed T1, signed distance to the intracranial mask, enclosed-by-head)."""
    from nilearn import datasets

    img = datasets.load_mni152_template(resolution=1)
    t1 = img.get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    ic = ndi.binary_fill_holes(t1 > 0)
    dist = (ndi.distance_transform_edt(~ic) - ndi.distance_transform_edt(ic)).astype(np.float32)
    near = dist <= 16
    encl = np.stack([ndi.binary_fill_holes(near[:, :, z]) for z in range(near.shape[2])], 2) & ~near
    t1s = ndi.gaussian_filter(t1, 1.0) / max(float(t1.max()), 1e-6)
    stack = np.stack([gm, wm, t1s, dist, encl.astype(np.float32)]).transpose(0, 3, 2, 1)  # C, Z, Y, X
    # superior sagittal sinus: 1.5 mm outside the midline intracranial boundary, front to torcula
    aff = img.affine
    x0 = round(-aff[0, 3])
    mid = ic[x0 - 3 : x0 + 4].any(0)
    cy, cz = -18.0 - aff[1, 3], 12.0 - aff[2, 3]
    ang = np.deg2rad(np.arange(5.0, 215.0, 2.0))
    rs = np.arange(0.0, 140.0, 0.5)
    yy = np.clip(np.round(cy + np.cos(ang)[:, None] * rs), 0, mid.shape[0] - 1).astype(int)
    zz = np.clip(np.round(cz + np.sin(ang)[:, None] * rs), 0, mid.shape[1] - 1).astype(int)
    rb = ndi.gaussian_filter1d(np.array([rs[np.flatnonzero(m)].max() for m in mid[yy, zz]]), 2.0) + 1.5
    sss = np.stack([0 * ang, cy + aff[1, 3] + np.cos(ang) * rb, cz + aff[2, 3] + np.sin(ang) * rb], 1)
    return {"stack": np.ascontiguousarray(stack), "affine": aff, "sss": sss}


@dataclass
class _Geom:
    nx: int  # output matrix
    nsl: int
    px: float
    dz: float
    affine: np.ndarray
    ns: int  # simulation pixels across the FOV
    s: float  # simulation in-plane step
    i0: int  # crop start (simulation pixels)
    shape: tuple[int, int, int]  # simulation grid (z, y, x)
    origin: np.ndarray  # LPS of simulation voxel (0, 0, 0) as (x, y, z)

    @property
    def step(self) -> np.ndarray:  # (x, y, z) mm
        return np.array([self.s, self.s, self.dz / 2])

    def lps_to_sim(self, p: np.ndarray) -> np.ndarray:  # -> (x, y, z) continuous simulation index
        return (np.asarray(p) - self.origin) / self.step

    def sim_to_lps(self, v: np.ndarray) -> np.ndarray:
        return np.asarray(v) * self.step + self.origin

    def lps_to_out(self, p: np.ndarray) -> np.ndarray:  # -> (i, j, k)
        return (np.asarray(p) - self.affine[:3, 3]) / np.diag(self.affine)[:3]


def _geometry(cfg: SynthConfig) -> _Geom:
    n, dz = cfg.matrix, cfg.slice_mm
    px = cfg.fov_mm / n
    nsl = round((cfg.z_range_mm[1] - cfg.z_range_mm[0]) / dz)
    x0, y0 = FOV_CENTRE_LPS[0] - cfg.fov_mm / 2, FOV_CENTRE_LPS[1] - cfg.fov_mm / 2
    aff = np.diag([px, px, dz, 1.0])
    aff[:3, 3] = (x0 + px / 2, y0 + px / 2, cfg.z_range_mm[0] + dz / 2)
    ns = min(n, SIM_MAX)
    s = cfg.fov_mm / ns
    i0 = max(0, int(np.floor((-X_HALF - x0) / s)))
    i1 = min(ns, int(np.ceil((X_HALF - x0) / s)))
    origin = np.array([x0 + (i0 + 0.5) * s, y0 + 0.5 * s, cfg.z_range_mm[0] - (Z_MARGIN - 0.5) * dz / 2])
    return _Geom(n, nsl, px, dz, aff, ns, s, i0, (2 * nsl + 2 * Z_MARGIN, ns, i1 - i0), origin)


def _hat(x: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Linear-interpolation weights of points ``x`` on equispaced ``nodes``: [len(x), len(nodes)]."""
    h = nodes[1] - nodes[0]
    return np.clip(1.0 - np.abs(np.asarray(x)[:, None] - nodes[None, :]) / h, 0.0, 1.0).astype(np.float32)


class _Warp:
    """Patient LPS mm -> MNI RAS mm: scaled rotation + translation + a smooth random displacement."""

    def __init__(self, rng: np.random.Generator, cfg: SynthConfig, g: _Geom):
        a, b, c = np.deg2rad(rng.uniform([-6, -3, -5], [6, 3, 5]))
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
        self.m = rz @ ry @ rx @ np.diag(rng.uniform(0.92, 1.06) * rng.uniform(0.97, 1.03, 3))
        self.t = rng.uniform([-4, -4, -3], [4, 4, 3])
        lo, hi = g.origin, g.sim_to_lps(np.array(g.shape[::-1]) - 1)
        n_nodes = [max(2, int(np.ceil((hi[d] - lo[d]) / 16.0)) + 1) for d in range(3)]  # ~16 mm apart
        self.nodes = [np.linspace(lo[d], hi[d], n_nodes[d]) for d in range(3)]
        c = rng.standard_normal((3, *(len(q) for q in self.nodes[::-1])))  # component, z, y, x
        c = np.stack([ndi.gaussian_filter(ci, 1.0, mode="nearest") for ci in c])
        self.ctrl = (c * cfg.warp_mm / np.sqrt(3.0) / max(float(c.std()), 1e-6)).astype(np.float32)

    def disp(self, p: np.ndarray) -> np.ndarray:
        w = [_hat(p[:, d], self.nodes[d]) for d in range(3)]
        return np.einsum("kabc,pa,pb,pc->pk", self.ctrl, w[2], w[1], w[0], optimize=True)

    def to_mni(self, p: np.ndarray) -> np.ndarray:
        p = np.atleast_2d(p)
        return (p * FLIP) @ self.m.T + self.t + self.disp(p)

    def to_lps(self, q: np.ndarray) -> np.ndarray:
        q, minv = np.atleast_2d(np.asarray(q, float)), np.linalg.inv(self.m)
        p = ((q - self.t) @ minv.T) * FLIP
        for _ in range(6):
            p = ((q - self.t - self.disp(p)) @ minv.T) * FLIP
        return p

    def grid(self, g: _Geom) -> np.ndarray:
        """MNI coordinates of every simulation voxel: [3 (x, y, z), Z, Y, X] float32."""
        ax = [g.origin[d] + np.arange(g.shape[2 - d]) * g.step[d] for d in range(3)]
        w = [_hat(ax[d], self.nodes[d]) for d in range(3)]
        out = np.einsum("kabc,za,yb,xc->kzyx", self.ctrl, w[2], w[1], w[0], optimize=True)
        m = self.m * FLIP[None, :]
        for k in range(3):
            out[k] += (m[k, 0] * ax[0][None, None, :] + m[k, 1] * ax[1][None, :, None]
                       + (m[k, 2] * ax[2] + self.t[k])[:, None, None]).astype(np.float32)
        return out


def _sample(tpl: dict, mni: np.ndarray) -> np.ndarray:
    """Trilinear sample of the template channels at MNI coordinates: [C, Z, Y, X]."""
    import torch

    stack, aff = tpl["stack"], tpl["affine"]
    size = np.array(stack.shape[1:][::-1], float)  # X, Y, Z
    grid = np.empty((*mni.shape[1:], 3), np.float32)
    for d in range(3):
        grid[..., d] = (mni[d] - aff[d, 3]) / aff[d, d] * (2.0 / (size[d] - 1)) - 1.0
    out = torch.nn.functional.grid_sample(torch.from_numpy(stack)[None], torch.from_numpy(grid)[None],
                                          mode="bilinear", padding_mode="border", align_corners=True)
    return out[0].numpy()


def _ellipsoid(mni: np.ndarray, box: tuple, centre, semi, edge_mm: float = 1.0) -> np.ndarray:
    """Soft membership (1 inside, ~edge_mm ramp) of an ellipsoid given in MNI mm, on a sub-box."""
    q = sum(((mni[d][box] - centre[d]) / semi[d]) ** 2 for d in range(3))
    return np.clip((1.0 - np.sqrt(q)) * min(semi) / edge_mm + 0.5, 0.0, 1.0)


def _box(g: _Geom, warp: _Warp, centre, semi) -> tuple:
    """Simulation-grid slices (z, y, x) around an MNI ellipsoid."""
    c = g.lps_to_sim(warp.to_lps(centre)[0])
    h = (max(semi) * 1.25 + 2 + 2 * float(np.abs(warp.ctrl).max())) / g.step
    lo = np.maximum(np.floor(c - h).astype(int), 0)
    hi = np.minimum(np.ceil(c + h).astype(int) + 1, g.shape[::-1])
    return tuple(slice(int(lo[d]), int(max(hi[d], lo[d]))) for d in (2, 1, 0))


def _walk(rng, g: _Geom, dist: np.ndarray, seeds: np.ndarray, steps: np.ndarray, medullary: bool) -> list:
    """Random smooth 3D curves (LPS mm), vectorised over veins: cortical ones follow the brain surface,
    medullary ones run outward from the ventricles. Returns a list of [n_i, 3] point arrays."""
    def look(p):
        v = np.clip(np.round(g.lps_to_sim(p)).astype(int), 0, np.array(g.shape[::-1]) - 1)
        return dist[v[:, 2], v[:, 1], v[:, 0]]

    def normal(p):
        e = np.eye(3)
        gr = np.stack([look(p + 1.2 * e[d]) - look(p - 1.2 * e[d]) for d in range(3)], 1)
        return gr / np.maximum(np.linalg.norm(gr, axis=1, keepdims=True), 1e-6)

    n, pos = len(seeds), seeds.copy()
    nrm = normal(pos)
    d = rng.standard_normal((n, 3)) + (1.5 * nrm if medullary else 0.0)
    out, alive, length = [pos.copy()], np.ones(n, bool), np.ones(n, int)
    for it in range(int(steps.max()) if n else 0):
        nrm = normal(pos)
        d = d / np.linalg.norm(d, axis=1, keepdims=True) + 0.22 * rng.standard_normal((n, 3))
        if medullary:
            d += 0.35 * nrm * [1.0, 1.0, 0.3]
        else:
            d -= (np.sum(d * nrm, 1, keepdims=True) + 0.5 * (look(pos) + 2.5)[:, None]) * nrm
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
        pos = pos + 0.7 * d * alive[:, None]
        length += alive
        alive &= (it + 1 < steps) & (look(pos) < (-3.0 if medullary else 1.5))
        out.append(pos.copy())
        if not alive.any():
            break
    pts = np.stack(out, 1)
    return [pts[v, : length[v]] for v in range(n)]


def _splat(g: _Geom, veins: list) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise tubes with partial volume (dense cross-section disk samples binned to voxels):
    returns (blood fraction, chi contribution) on the simulation grid."""
    pos, wts, chis = [], [], []
    vox = float(np.prod(g.step))
    for v in veins:
        p = v["pts"]
        if len(p) < 2:
            continue
        r = v["radius"]
        h = float(np.clip(r / 2, 0.3, 0.6))
        p = _resample(p, h)
        t = np.gradient(p, axis=0)
        ds = np.linalg.norm(t, axis=1)
        t /= np.maximum(ds, 1e-6)[:, None]
        o = np.arange(-r + h / 2, r, h)
        oo = np.array([(a, b) for a in o for b in o if a * a + b * b <= r * r] or [(0.0, 0.0)])
        e1 = np.cross(t, [0.3, 0.5, 0.81])
        e1 /= np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-6)
        e2 = np.cross(t, e1)
        q = p[:, None, :] + oo[None, :, 0, None] * e1[:, None] + oo[None, :, 1, None] * e2[:, None]
        pos.append(q.reshape(-1, 3))
        wts.append(np.repeat(np.pi * r * r * ds / len(oo) / vox, len(oo)))
        chis.append(np.full(q.shape[0] * q.shape[1], v["dchi"]))
    n = int(np.prod(g.shape))
    if not pos:
        return np.zeros(g.shape, np.float32), np.zeros(g.shape, np.float32)
    v = np.round(g.lps_to_sim(np.concatenate(pos))).astype(np.int64)  # samples are dense: nearest voxel
    w0, c0 = np.concatenate(wts), np.concatenate(chis)
    ok = np.all((v >= 0) & (v < np.array(g.shape[::-1])), axis=1)
    flat = np.ravel_multi_index((v[ok, 2], v[ok, 1], v[ok, 0]), g.shape)
    acc = np.bincount(flat, w0[ok], n)
    accc = np.bincount(flat, (w0 * c0)[ok], n)
    scale = 1.0 / np.maximum(acc, 1.0)
    return ((acc * scale).reshape(g.shape).astype(np.float32),
            (accc * scale).reshape(g.shape).astype(np.float32))


def _resample(poly: np.ndarray, step: float = 0.7) -> np.ndarray:
    """Points every ``step`` mm along a polyline."""
    seg = np.linalg.norm(np.diff(poly, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.arange(0.0, s[-1] + 1e-9, step)
    return np.stack([np.interp(t, s, poly[:, d]) for d in range(3)], 1)


def _anatomy(rng, cfg: SynthConfig, g: _Geom, warp: _Warp, tpl: dict) -> dict:
    """Tissue maps on the simulation grid: M (magnitude before T2*), R2*, chi, plus masks and mimics."""
    mni = warp.grid(g)
    gm, wm, t1s, dist, encl = _sample(tpl, mni)
    icw = np.clip(0.5 - dist, 0.0, 1.0)
    gm, wm = np.clip(gm, 0, 1) * icw, np.clip(wm, 0, 1) * icw
    csf = np.clip(icw - gm - wm, 0.0, 1.0)
    t_csf = rng.uniform(1.0, 2.0)
    t_sk, t_sc = t_csf + rng.uniform(4.5, 7.0), rng.uniform(13.5, 16.0)

    def ramp(lo, hi):
        return np.clip(dist - lo + 0.5, 0, 1) * np.clip(hi - dist + 0.5, 0, 1)

    ocsf, skull, scalp = ramp(0.0, t_csf), ramp(t_csf, t_sk), ramp(t_sk, t_sc)
    deep = np.clip(encl, 0, 1) * np.clip(dist - t_sc + 0.5, 0, 1)
    mg, mw, mc, ms = (rng.uniform(0.92, 1.08) * v for v in (0.66, 0.80, 1.0, 0.75))
    rg, rw = rng.uniform(17, 20), rng.uniform(20, 22)
    m0 = (gm * mg + wm * mw) * (0.94 + 0.12 * t1s) + (csf + ocsf) * mc
    m0 += skull * 0.04 + scalp * ms + deep * 0.12
    wsum = np.maximum(gm + wm + csf + ocsf + skull + scalp + deep, 1e-3)
    r2 = (gm * rg + wm * rw + (csf + ocsf) * 3.0 + skull * 300.0 + scalp * 25.0 + deep * 100.0) / wsum
    chi = gm * 0.02 - wm * 0.03
    label = np.zeros(g.shape, np.uint8)
    iron = rng.uniform(1.0, 1.6)
    mimics = []
    for code, (name, (c, semi, x, r)) in enumerate(NUCLEI.items(), 1):
        for side in (1, -1):
            cc = (side * c[0], c[1], c[2])
            box = _box(g, warp, cc, semi)
            m = _ellipsoid(mni, box, cc, semi) * np.clip((gm[box] + wm[box]) * 1.5, 0, 1)
            xn, rn = 0.02 + (x - 0.02) * iron, 20.0 + (r - 20.0) * iron
            chi[box] += m * (xn - chi[box])
            r2[box] += m * (rn - r2[box])
            label[box] = np.where(m > 0.5, code, label[box])
            if name != "thalamus":
                mimics.append(("iron", name, warp.to_lps(cc)[0], 2.0 * np.sqrt(semi[0] * semi[1])))
    if cfg.air:
        for name, (c, semi, x) in AIR.items():
            for side in ((1, -1) if c[0] else (1,)):
                cc = (side * c[0], c[1], c[2])
                box = _box(g, warp, cc, semi)
                m = _ellipsoid(mni, box, cc, semi, 1.5) * np.clip(dist[box] - 3.5, 0, 1)
                chi[box] += m * x
                m0[box] *= 1.0 - m
                zz, yy, xx = np.nonzero(m > 0.5)
                if len(zz):
                    lo = np.array([b.start for b in box[::-1]])
                    area = np.bincount(zz).max() * g.s * g.s
                    p = g.sim_to_lps(np.stack([xx, yy, zz], 1).mean(0) + lo)
                    mimics.append(("air", name, p, 2.0 * np.sqrt(area / np.pi)))
    return {"mni": mni, "gm": gm, "wm": wm, "csf": csf, "dist": dist, "m0": m0, "r2": r2, "chi": chi,
            "label": label, "mimics": mimics}


def _veins(rng, cfg: SynthConfig, g: _Geom, warp: _Warp, tpl: dict, an: dict) -> list[dict]:
    """Cortical (surface-following) and medullary (radial) random tubes plus the large sinuses/veins."""
    sub = (slice(Z_MARGIN, Z_MARGIN + 2 * g.nsl, 2), slice(None, None, 2), slice(None, None, 2))
    ds = an["dist"][sub]

    def seeds(mask, n):
        idx = np.flatnonzero(mask)
        if n <= 0 or not len(idx):
            return np.zeros((0, 3))
        z, y, x = np.unravel_index(rng.choice(idx, n, replace=len(idx) < n), mask.shape)
        return g.sim_to_lps(np.stack([2 * x, 2 * y, 2 * z + Z_MARGIN], 1) + rng.uniform(-0.5, 0.5, (n, 3)))

    n_cort = round(0.6 * cfg.veins)
    cort = seeds((ds > -2.0) & (ds < 0.5), n_cort)
    cs = an["csf"][sub]
    med = seeds((cs > 0.1) & (cs < 0.5) & (an["wm"][sub] > 0.4) & (ds < -14.0) & (an["label"][sub] == 0)
                & (np.abs(an["mni"][0][sub]) > 12), cfg.veins - n_cort)
    out = [{"pts": p, "radius": rng.uniform(0.4, 1.0), "kind": "cortical"}
           for p in _walk(rng, g, an["dist"], cort, rng.integers(40, 121, len(cort)), False)]
    out += [{"pts": p, "radius": rng.uniform(0.3, 0.6), "kind": "medullary"}
            for p in _walk(rng, g, an["dist"], med, rng.integers(20, 46, len(med)), True)]
    big = [("sinus", tpl["sss"], 3.2)]
    for name, (poly, r) in BIG_VEINS.items():
        poly = np.array(poly, float)
        sides = (1, -1) if poly[:, 0].any() else (1,)
        big += [("sinus" if "sinus" in name else "deep", poly * [s, 1, 1], r) for s in sides]
    for kind, poly, r in big:
        pts = warp.to_lps(_resample(np.asarray(poly, float), 1.5))
        out.append({"pts": pts, "radius": r * rng.uniform(0.85, 1.15), "kind": kind})
    for v in out:
        v["pts"] = _resample(v["pts"], 0.7) if len(v["pts"]) > 1 else v["pts"]
        v["dchi"] = 3.39 * rng.uniform(0.38, 0.45) * (1.0 - rng.uniform(0.55, 0.70))
    return out


@functools.lru_cache(maxsize=4)
def _kernel(shape: tuple[int, int, int], step: tuple[float, float, float]) -> np.ndarray:
    """Dipole kernel D = 1/3 - kz^2/k^2 on an rfft grid (B0 along array axis 0 = z)."""
    kz, ky = sfft.fftfreq(shape[0], step[0]), sfft.fftfreq(shape[1], step[1])
    kx = sfft.rfftfreq(shape[2], step[2])
    k2 = kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2
    k2[0, 0, 0] = 1.0
    d = 1.0 / 3.0 - kz[:, None, None] ** 2 / k2
    d[0, 0, 0] = 0.0
    return d.astype(np.float32)


def _gre(an: dict, g: _Geom, cfg: SynthConfig, w: float) -> np.ndarray:
    """Complex GRE signal on the simulation grid, averaged over sub-slices to [slice, y, x]."""
    chi = an["chi"]
    pad = tuple(sfft.next_fast_len(n + 32, real=True) for n in chi.shape)
    spec = sfft.rfftn(chi, s=pad, workers=1)
    spec *= _kernel(pad, (g.dz / 2, g.s, g.s))
    phi = sfft.irfftn(spec, s=pad, workers=1)[: chi.shape[0], : chi.shape[1], : chi.shape[2]]
    phi *= np.float32(-w)  # Haacke sign: paramagnetic -> negative phase
    mag = an["m0"] * np.exp(np.float32(-cfg.te_ms * 1e-3) * an["r2"])
    for ax in range(3):
        a = np.abs(np.gradient(phi, axis=ax)) * np.float32(1 / (2 * np.pi))
        f = np.abs(np.sinc(a))
        mag *= np.where(a < 1, f, 0.1 * f)
    s = mag * np.exp(1j * phi)
    s = s[Z_MARGIN : Z_MARGIN + 2 * g.nsl]
    return 0.5 * (s[0::2] + s[1::2])


def _to_output(g: _Geom, sig: np.ndarray, extra: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Place the cropped slab into the full FOV and resample in-plane to the output matrix."""
    full = np.zeros((g.nsl, 2 + len(extra), g.ns, g.ns), np.float32)
    sl = np.s_[:, :, g.i0 : g.i0 + sig.shape[2]]
    full[:, 0][sl], full[:, 1][sl] = sig.real, sig.imag
    for c, e in enumerate(extra):
        full[:, 2 + c][sl] = e
    if g.nx != g.ns:
        import torch

        full = torch.nn.functional.interpolate(
            torch.from_numpy(full), size=(g.nx, g.nx), mode="bilinear", align_corners=False).numpy()
    return full[:, 0] + 1j * full[:, 1], [full[:, 2 + c] for c in range(len(extra))]


def _sphere(c, a: float, dchi: float, g: _Geom, w: float) -> tuple[tuple, np.ndarray, float]:
    """Complex signal factor of a sub-voxel sphere (radius a mm, dchi ppm; signal void inside, analytic
    dipole field outside) averaged over supersampled output voxels near output voxel ``c`` = (i, j, k).
    Returns (slices into [k, j, i], factor, apparent in-plane diameter mm fitted to |factor| < 0.7)."""
    rl = min(a * (abs(dchi) * w * 2 / 3 / 0.1) ** (1 / 3), 14.0)
    h = np.array([np.ceil(rl / g.px) + 1, np.ceil(rl / g.px) + 1, np.ceil(rl / g.dz) + 1], int)
    lim = np.array([g.nx, g.nx, g.nsl])
    lo = np.clip(np.round(c).astype(int) - h, 0, lim)
    hi = np.clip(np.round(c).astype(int) + h + 1, 0, lim)
    ss = 5 if a < 1.0 else 3
    ssz = max(2, int(np.ceil(ss * g.dz / g.px)))

    def axis(d, n, step):
        o = (np.arange(n) + 0.5) / n - 0.5
        return (((np.arange(lo[d], hi[d])[:, None] + o[None, :]) - c[d]) * step).astype(np.float32)

    x, y, z = axis(0, ss, g.px), axis(1, ss, g.px), axis(2, ssz, g.dz)
    zz = (z**2)[:, :, None, None, None, None]
    r2 = zz + (y**2)[None, None, :, :, None, None] + (x**2)[None, None, None, None, :, :]
    r2 = np.maximum(r2, np.float32(1e-6))
    ph = np.float32(-w * dchi / 3 * a**3) * (3 * zz - r2) / (r2 * r2 * np.sqrt(r2))
    f = np.where(r2 > a * a, np.exp(1j * ph), 0).mean(axis=(1, 3, 5)).astype(np.complex64)
    rho = np.sqrt((np.abs(f) < 0.7).sum((1, 2)) * g.px**2 / np.pi)
    zk = (np.arange(lo[2], hi[2]) - c[2]) * g.dz
    rr = np.arange(0.25, 10.0, 0.05)
    err = ((np.sqrt(np.clip(rr[:, None] ** 2 - zk[None, :] ** 2, 0, None)) - rho[None, :]) ** 2).sum(1)
    diam = max(2.0 * float(rr[np.argmin(err)]), g.px)  # at least a pixel (coarse matrices)
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])), f, diam


def _place_cmbs(rng, cfg: SynthConfig, g: _Geom, an: dict, veins: list[dict]) -> list[tuple]:
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
    bs = _ellipsoid(mni, (slice(None),) * 3, *BRAINSTEM) > 0.5
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


def _vein_dots(g: _Geom, veins: list[dict]) -> list[tuple]:
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


def _finish(rng, cfg: SynthConfig, g: _Geom, sig: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Bias field, complex noise (Rician magnitude), SWI phase mask (homodyne 32x32 high-pass, f^4),
    scaling to integers 0..4095 (white matter median -> 1000)."""
    u = ((np.arange(g.nx) + 0.5) / g.nx * 2 - 1).astype(np.float32)
    t = ((np.arange(g.nsl) + 0.5) / g.nsl * 2 - 1).astype(np.float32)
    x, y, z = u[None, None, :], u[None, :, None], t[:, None, None]
    bias = np.zeros(sig.shape, np.float32)
    for coef, term in zip(rng.standard_normal(9), (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)):
        bias += np.float32(coef) * term  # a random smooth quadratic
    head = np.abs(sig) > 0.05 * np.abs(sig).max()
    bias -= np.median(bias[head])
    bias *= np.float32(0.5 / max(float(np.abs(bias[head]).max()), 1e-6))
    sig = sig * np.exp(np.float32(rng.uniform(*cfg.bias_strength)) * bias)
    ref = wm > 0.9 if (wm > 0.9).sum() > 50 else head
    sd = np.median(np.abs(sig)[ref]) / rng.uniform(*cfg.snr)
    noise = rng.standard_normal((2, *sig.shape), dtype=np.float32) * np.float32(sd)
    sig = (sig + (noise[0] + 1j * noise[1])).astype(np.complex64)
    kk = np.fft.fftfreq(g.nx) * g.nx
    win = np.where(np.abs(kk) < 16, 0.5 * (1 + np.cos(np.pi * kk / 16)), 0.0).astype(np.float32)
    lp = sfft.ifft2(sfft.fft2(sig, axes=(1, 2)) * (win[:, None] * win[None, :]), axes=(1, 2))
    ph = np.angle(sig * np.conj(lp))
    swi = np.abs(sig) * np.where(ph < 0, (np.pi + ph) / np.pi, 1.0) ** 4
    return np.clip(np.round(swi * (1000.0 / np.median(swi[ref]))), 0, 4095).astype(np.float32)


def synthesize_patient(index: int, cfg: SynthConfig) -> Volume:
    """One synthetic SWI magnitude volume ``SYN-{index+1:04d}`` with its CMBs and mimics (deterministic)."""
    rng = np.random.default_rng([cfg.seed, index])
    g, tpl = _geometry(cfg), _template()
    warp = _Warp(rng, cfg, g)
    w = 2 * np.pi * GAMMA_MHZ_T * cfg.field_t * cfg.te_ms * 1e-3  # rad per ppm
    an = _anatomy(rng, cfg, g, warp, tpl)
    veins = _veins(rng, cfg, g, warp, tpl, an)
    frac, vchi = _splat(g, veins)
    an["chi"] = an["chi"] * (1 - frac) + vchi
    an["m0"] *= 1 - 0.2 * frac
    an["r2"] += 80.0 * frac
    cmbs = _place_cmbs(rng, cfg, g, an, veins)
    wm_sl = an["wm"][Z_MARGIN : Z_MARGIN + 2 * g.nsl]
    sig, (wm,) = _to_output(g, _gre(an, g, cfg, w), [0.5 * (wm_sl[0::2] + wm_sl[1::2])])
    iron_air = an.pop("mimics")
    del an
    lesions = []
    for n, (pt, a, dchi, loc) in enumerate(cmbs, 1):
        c = g.lps_to_out(pt)
        sl, f, diam = _sphere(c, a, dchi, g, w)
        sig[sl] *= f
        lesions.append(SynthLesion(n, tuple(float(v) for v in c), diam, "cmb", loc, radius_true_mm=a,
                                   dchi_ppm=dchi))
    found = []
    for _ in range(int(rng.integers(cfg.calcifications[0], cfg.calcifications[1] + 1))):
        site = list(CALC_SITES)[int(rng.integers(len(CALC_SITES)))]
        cc = np.array(CALC_SITES[site], float) * [rng.choice([-1, 1]), 1, 1] + rng.uniform(-2, 2, 3)
        a, dchi = float(rng.uniform(0.4, 1.5)), float(rng.uniform(-1.0, -0.3))
        pt = warp.to_lps(cc)[0]
        sl, f, diam = _sphere(g.lps_to_out(pt), a, dchi, g, w)
        sig[sl] *= f
        found.append(("calcification", site, pt, diam, a, dchi))
    data = _finish(rng, cfg, g, sig, wm)
    found += [(*m, float("nan"), float("nan")) for m in _vein_dots(g, veins) + iron_air]
    mimics = []
    for kind, loc, pt, diam, a, dchi in found:
        c = g.lps_to_out(pt)
        if -0.5 <= c[2] < g.nsl - 0.5:
            mimics.append(SynthLesion(len(mimics) + 1, tuple(float(v) for v in c), float(diam), kind, loc,
                                      radius_true_mm=a, dchi_ppm=dchi))
    return Volume(data, g.affine.copy(), f"SYN-{index + 1:04d}", lesions, mimics, source="cmbfe.synth")


LESION_COLUMNS = ["lesion_id", "patient_id", "kind", "location", "i", "j", "k", "x_mm", "y_mm", "z_mm",
                  "diameter_mm", "radius_true_mm", "dchi_ppm"]
MIMIC_COLUMNS = ["mimic_id", "patient_id", "kind", "location", "i", "j", "k", "x_mm", "y_mm", "z_mm",
                 "diameter_mm"]
COHORT_COLUMNS = ["patient_id", "n_slices", "n_cmb", "seed"]


def _table(vol: Volume, objs: list[Lesion], columns: list[str]) -> pd.DataFrame:
    rows = []
    for o in objs:
        ijk = np.array(o.centre_vox, float)
        xyz = vol.vox_to_mm(ijk)
        row = [o.lesion_id, vol.patient_id, o.kind, o.location, *np.round(ijk, 3), *np.round(xyz, 3),
               round(o.diameter_mm, 3), round(float(getattr(o, "radius_true_mm", np.nan)), 4),
               round(float(getattr(o, "dchi_ppm", np.nan)), 4)]
        rows.append(row[: len(columns)])
    return pd.DataFrame(rows, columns=columns)


def lesion_table(vol: Volume) -> pd.DataFrame:
    """The volume's CMBs as rows of ``lesions.csv`` (voxel i, j, k and LPS mm)."""
    return _table(vol, vol.lesions, LESION_COLUMNS)


def mimic_table(vol: Volume) -> pd.DataFrame:
    """The volume's mimics as rows of ``mimics.csv``."""
    return _table(vol, vol.mimics, MIMIC_COLUMNS)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    _template()


def _write_patient(index: int, cfg: SynthConfig, root: str) -> dict:
    """Synthesize one patient and write its DICOM series and CSVs under ``root``; return its stats."""
    t = time.perf_counter()
    vol = synthesize_patient(index, cfg)
    pdir = Path(root) / vol.patient_id
    write_dicom_series(vol, pdir / "dicom", uid_seed=f"cmbfe-synth-{cfg.seed}-{vol.patient_id}",
                       echo_time_ms=cfg.te_ms, field_t=cfg.field_t)
    lesion_table(vol).to_csv(pdir / "lesions.csv", index=False)
    mimic_table(vol).to_csv(pdir / "mimics.csv", index=False)
    boxes = volume_slice_boxes(vol)
    return {"patient_id": vol.patient_id, "n_slices": vol.shape[0], "n_cmb": len(vol.lesions),
            "seed": cfg.seed,
            "n_cmb_boxes": sum(len(b) for b in boxes.values()), "n_cmb_slices": len(boxes),
            "n_mimics": len(vol.mimics), "seconds": round(time.perf_counter() - t, 3)}


def synthesize_cohort(
    out_dir: Path, cfg: SynthConfig, progress: bool = True, overwrite: bool = False
) -> pd.DataFrame:
    """Write the cohort (``SYN-xxxx/dicom``, ``lesions.csv``, ``mimics.csv``, ``cohort.csv``) atomically.

    Built in a temp sibling folder and renamed at the end; an existing non-empty ``out_dir`` is an
    error unless ``overwrite``. Returns the cohort table (the ``cohort.csv`` columns plus per-patient
    ``n_cmb_boxes``, ``n_cmb_slices``, ``n_mimics``, ``seconds``).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir}: exists and is not empty (use --overwrite to replace it)")
    if cfg.workers > 1 and cfg.patients > 1 and not _cache_file().is_file():
        _template()  # build the disk cache once, not in every worker
    rows = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        bar = tqdm(total=cfg.patients, desc="synth", unit="patient", disable=not progress)
        if cfg.workers <= 1 or cfg.patients == 1:
            for i in range(cfg.patients):
                rows.append(_write_patient(i, cfg, str(tmp)))
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")  # torch/OpenMP are not fork-safe
            ex = ProcessPoolExecutor(min(cfg.workers, cfg.patients), mp_context=ctx, initializer=_init_worker)
            try:
                futs = [ex.submit(_write_patient, i, cfg, str(tmp)) for i in range(cfg.patients)]
                for fut in as_completed(futs):
                    rows.append(fut.result())
                    bar.update()
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
        bar.close()
        df = pd.DataFrame(rows).sort_values("patient_id").reset_index(drop=True)
        df[COHORT_COLUMNS].to_csv(tmp / "cohort.csv", index=False)
    return df


def main(argv: list[str] | None = None) -> int:
    """``cmbfe synth --out DIR [--params P] [--patients N] [--seed S] [--matrix M] [--workers W]
    [--overwrite]``; prints one summary line."""
    ap = argparse.ArgumentParser(prog="cmbfe synth",
                                 description="Generate the synthetic SWI cohort (DICOM + ground truth).")
    ap.add_argument("--out", required=True, type=Path, help="output folder (created atomically)")
    ap.add_argument("--params", default=None, help="profile name (smoke/default/paper) or params YAML file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. synth.snr=[30,40]")
    ap.add_argument("--patients", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--matrix", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    flags = [f"synth.{k}={getattr(args, k)}" for k in ("patients", "seed", "matrix", "workers")
             if getattr(args, k) is not None]  # synth.* overrides, checked with the profile at load
    cfg = load(args.params, [*args.set, *flags]).synth
    t = time.perf_counter()
    df = synthesize_cohort(args.out, cfg, progress=not args.quiet, overwrite=args.overwrite)
    print(f"synth: {len(df)} patients, {int(df.n_cmb.sum())} CMBs, {int(df.n_cmb_boxes.sum())} CMB boxes on "
          f"{int(df.n_cmb_slices.sum())} slices, {time.perf_counter() - t:.1f} s -> {args.out}")
    return 0
