"""Synthetic patients, part 2: the susceptibility physics and the acquisition (used by :mod:`cmbfe.synth`).

The chi map gives the field by an FFT dipole kernel (B0 along z); the GRE signal (:func:`gre_signal`) has T2*
decay, intravoxel dephasing and phase (Haacke sign: paramagnetic -> negative phase). Complex sub-slices are
averaged to the slices and resampled to the output grid (:func:`to_output`). CMBs and calcifications are
sub-voxel spheres with the analytic dipole field evaluated in local supersampled patches on the output grid
(:func:`sphere_factor`: blooming). Then bias field, complex Gaussian noise (Rician magnitude), SWI phase mask
(homodyne high-pass, f^4) and scaling to integers 0..4095 (:func:`finish_swi`).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import fft as sfft

from cmbfe.config import SynthConfig
from cmbfe.synth_anatomy import Z_MARGIN, Geom

GAMMA_MHZ_T = 42.577478


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


def gre_signal(an: dict, g: Geom, cfg: SynthConfig, w: float) -> np.ndarray:
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


def to_output(g: Geom, sig: np.ndarray, extra: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
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


def sphere_factor(c, a: float, dchi: float, g: Geom, w: float) -> tuple[tuple, np.ndarray, float]:
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


def finish_swi(rng, cfg: SynthConfig, g: Geom, sig: np.ndarray, wm: np.ndarray) -> np.ndarray:
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
