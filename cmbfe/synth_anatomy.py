"""Synthetic patients, part 1: the anatomy on the simulation grid (used by :mod:`cmbfe.synth`).

The nilearn MNI152 template (GM/WM/T1, bundled, offline; channels cached on disk, :func:`template`) is warped
by a random affine + smooth deformation (:class:`Warp`) onto a simulation grid (:func:`geometry`: output
in-plane pixels, at most ``SIM_MAX`` across, slice_mm/2 sub-slices, cropped to the head); a head shell (CSF,
dark skull, scalp) surrounds the brain. :func:`anatomy` gives the tissue maps (magnitude before T2*, R2*,
susceptibility chi with iron in deep nuclei and sinus/mastoid air, labels, iron/air mimics);
:func:`draw_veins` the venous tubes (cortical, medullary, sinuses) that :func:`splat_veins` rasterises with
partial volume.
Coordinates: LPS mm for the patient, MNI RAS mm for the template, simulation arrays ``[z, y, x]``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from cmbfe.config import SynthConfig

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
BRAINSTEM = ((0, -27, -30), (12, 14, 22))
# large veins (MNI RAS polylines, radius mm); the superior sagittal sinus is traced from the template
BIG_VEINS = {
    "internal_cerebral": ([(2, 2, 17), (2, -18, 16), (1, -38, 8), (0, -46, 4)], 1.3),
    "straight_sinus": ([(0, -46, 4), (0, -70, 0), (0, -96, -4)], 2.2),
    "transverse_sinus": ([(0, -100, -6), (28, -98, -10), (48, -78, -22), (55, -52, -36), (46, -34, -52)],
                         3.0),
}


def cache_file() -> Path:
    root = Path(os.environ.get("CMBFE_CACHE", Path.home() / ".cache" / "cmbfe"))
    return root / f"synth_template_{TEMPLATE_VERSION}.npz"


@functools.lru_cache(maxsize=1)
def template() -> dict:
    """Template channels, computed once and kept in a disk cache (``$CMBFE_CACHE`` or ~/.cache/cmbfe)."""
    f = cache_file()
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
class Geom:
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


def geometry(cfg: SynthConfig) -> Geom:
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
    return Geom(n, nsl, px, dz, aff, ns, s, i0, (2 * nsl + 2 * Z_MARGIN, ns, i1 - i0), origin)


def _hat(x: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Linear-interpolation weights of points ``x`` on equispaced ``nodes``: [len(x), len(nodes)]."""
    h = nodes[1] - nodes[0]
    return np.clip(1.0 - np.abs(np.asarray(x)[:, None] - nodes[None, :]) / h, 0.0, 1.0).astype(np.float32)


class Warp:
    """Patient LPS mm -> MNI RAS mm: scaled rotation + translation + a smooth random displacement."""

    def __init__(self, rng: np.random.Generator, cfg: SynthConfig, g: Geom):
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

    def grid(self, g: Geom) -> np.ndarray:
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


def ellipsoid(mni: np.ndarray, box: tuple, centre, semi, edge_mm: float = 1.0) -> np.ndarray:
    """Soft membership (1 inside, ~edge_mm ramp) of an ellipsoid given in MNI mm, on a sub-box."""
    q = sum(((mni[d][box] - centre[d]) / semi[d]) ** 2 for d in range(3))
    return np.clip((1.0 - np.sqrt(q)) * min(semi) / edge_mm + 0.5, 0.0, 1.0)


def _box(g: Geom, warp: Warp, centre, semi) -> tuple:
    """Simulation-grid slices (z, y, x) around an MNI ellipsoid."""
    c = g.lps_to_sim(warp.to_lps(centre)[0])
    h = (max(semi) * 1.25 + 2 + 2 * float(np.abs(warp.ctrl).max())) / g.step
    lo = np.maximum(np.floor(c - h).astype(int), 0)
    hi = np.minimum(np.ceil(c + h).astype(int) + 1, g.shape[::-1])
    return tuple(slice(int(lo[d]), int(max(hi[d], lo[d]))) for d in (2, 1, 0))


def _walk(rng, g: Geom, dist: np.ndarray, seeds: np.ndarray, steps: np.ndarray, medullary: bool) -> list:
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


def splat_veins(g: Geom, veins: list) -> tuple[np.ndarray, np.ndarray]:
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


def anatomy(rng, cfg: SynthConfig, g: Geom, warp: Warp, tpl: dict) -> dict:
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
            m = ellipsoid(mni, box, cc, semi) * np.clip((gm[box] + wm[box]) * 1.5, 0, 1)
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
                m = ellipsoid(mni, box, cc, semi, 1.5) * np.clip(dist[box] - 3.5, 0, 1)
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


def draw_veins(rng, cfg: SynthConfig, g: Geom, warp: Warp, tpl: dict, an: dict) -> list[dict]:
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
