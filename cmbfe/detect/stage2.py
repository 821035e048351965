"""The second stage of ``cmbfe detect``: a small 3D CNN that keeps or drops each 3D candidate.

Candidate + discrimination (Dou et al. 2016): the detector runs at a low score threshold
(:data:`CANDIDATE_THRESHOLD`), its slice boxes are linked into 3D candidates
(:func:`cmbfe.detect.pipeline.merge_lesions`), and :class:`Stage2Net` gives each candidate a probability of
being a CMB from a small patch of the 8-bit preprocessed volume around its centre (:data:`PATCH` = slices,
rows, cols of the axial volume the detector saw; 5 x 16 x 16 voxels = 10 x 15 x 15 mm at the training
pixel) and four candidate features (:data:`FEATURES`). A candidate is kept when its probability reaches the
operating point's threshold (``screening``: lesion sensitivity >= 0.9 on the validation split; ``balanced``:
the best lesion F1 there; both chosen by :func:`choose_operating_points`).

Training (:func:`train_stage2`): the detector's candidates on the training split's scans; positives are
candidates whose centre lies within 3 mm of a true CMB of ``lesions.csv``, negatives all others (the
labelled mimics among them: hard negatives); seeded, deterministic on CPU. The weights are a state dict in
the model folder (:data:`cmbfe.modelfolder.STAGE2`, loaded with ``weights_only=True``); the settings and
operating points are ``detect.json``'s ``stage2`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

PATCH = (5, 16, 16)  # slices, rows, cols
CANDIDATE_THRESHOLD = 0.15
MATCH_MM = 3.0  # a candidate is a positive when its centre is within this distance of a true CMB
FEATURES = ("max_score", "top2_slice_scores", "n_slices", "diameter_mm")
OPERATING_POINTS = ("screening", "balanced")
FORMAT = "cmbfe-stage2/1"


class Stage2Net(nn.Module):
    """Patch ``(B, 5, 16, 16)`` in [about -4, 4] and features ``(B, 4)`` -> logit ``(B,)``; ~11k weights."""

    def __init__(self, width: int = 8, n_features: int = len(FEATURES)) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv3d(1, w, (1, 3, 3), padding=(0, 1, 1)),
            nn.ReLU(),
            nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(w, 2 * w, (3, 3, 3), padding=(1, 1, 1)),
            nn.ReLU(),
            nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(2 * w, 2 * w, (3, 3, 3), padding=(0, 1, 1)),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(4 * w + n_features, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        h = self.body(x[:, None])
        h = torch.cat([h.mean((2, 3, 4)), h.amax((2, 3, 4)), f], 1)
        return self.head(h)[:, 0]


@dataclass
class Stage2:
    """A loaded second stage: the network and its ``detect.json`` entry (``thresholds`` per operating point,
    ``candidate_threshold``, validation numbers)."""

    net: Stage2Net
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def candidate_threshold(self) -> float:
        return float(self.meta.get("candidate_threshold", CANDIDATE_THRESHOLD))

    def threshold(self, operating_point: str) -> float:
        return float(self.meta["operating_points"][operating_point]["threshold"])


# ------------------------------------------------------------------------------------------ inputs
def features(scores: np.ndarray, slices: np.ndarray, lesions: list[dict]) -> np.ndarray:
    """``(N, 4)`` float32 features of the candidates (:data:`FEATURES`, scaled to about [0, 2]): max slice
    score, sum of the two best per-slice scores, slices spanned (capped at 6), in-plane diameter (mm)."""
    out = np.zeros((len(lesions), len(FEATURES)), np.float32)
    for n, les in enumerate(lesions):
        g = np.asarray(les["members"], np.int64)
        per = np.sort([scores[g][slices[g] == k].max() for k in np.unique(slices[g])])[::-1]
        top2 = float(per[:2].sum())
        out[n] = (les["max_score"] * 4, top2 * 2, min(les["n_slices"], 6) / 3, les["diameter_mm"] / 5)
    return out


def patches(u8: np.ndarray, lesions: list[dict]) -> np.ndarray:
    """``(N, *PATCH)`` float32 patches of the ``[slice, row, col]`` 8-bit volume centred on each candidate
    (zero outside the volume), minus the patch median, times 4/255."""
    pz, py, px = PATCH
    nz, ny, nx = u8.shape
    out = np.zeros((len(lesions), pz, py, px), np.float32)
    for n, les in enumerate(lesions):
        ci, cj, ck = les["centre_vox"]
        z0, y0, x0 = round(ck) - pz // 2, round(cj) - py // 2, round(ci) - px // 2
        zs, ys, xs = (
            slice(max(a, 0), min(a + s, m)) for a, s, m in ((z0, pz, nz), (y0, py, ny), (x0, px, nx))
        )
        if zs.stop > zs.start and ys.stop > ys.start and xs.stop > xs.start:
            out[
                n, zs.start - z0 : zs.stop - z0, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0
            ] = u8[zs, ys, xs]
        out[n] = (out[n] - np.median(out[n])) * (4.0 / 255.0)
    return out


# ------------------------------------------------------------------------------------------ scoring
_VIEWS = (lambda x: x, lambda x: x.flip(2), lambda x: x.flip(3), lambda x: torch.rot90(x, 1, (2, 3)))


@torch.inference_mode()
def predict(net: Stage2Net, x: np.ndarray, f: np.ndarray, batch: int = 512) -> np.ndarray:
    """Probabilities ``(N,)``: the mean over four views (identity, two flips, a 90-degree rotation)."""
    if len(x) == 0:
        return np.zeros(0)
    net.eval()
    xt, ft = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(f))
    views = [
        torch.cat(
            [torch.sigmoid(net(v(xt[b : b + batch]), ft[b : b + batch])) for b in range(0, len(xt), batch)]
        )
        for v in _VIEWS
    ]
    return torch.stack(views).mean(0).double().numpy()


def score_candidates(
    st: Stage2, u8: np.ndarray, scores: np.ndarray, slices: np.ndarray, lesions: list[dict]
) -> np.ndarray:
    """The second stage's probability for each candidate of one scan."""
    return predict(st.net, patches(u8, lesions), features(scores, slices, lesions))


# ------------------------------------------------------------------------------------------ training
def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    for dim in (2, 3, 1):
        if rng.random() < 0.5:
            x = x.flip(dim)
    r = int(rng.integers(4))
    return torch.rot90(x, r, (2, 3)) if r else x


def train_net(
    x: np.ndarray,
    f: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    epochs: int = 25,
    lr: float = 2e-3,
    batch: int = 128,
    log: Any = None,
) -> Stage2Net:
    """Train :class:`Stage2Net` (Adam, cosine schedule, weighted BCE with positive weight
    ``n_neg / n_pos / 4``, random flips and 90-degree rotations); bit-reproducible on CPU for a seed."""
    if len(y) == 0 or y.sum() == 0 or y.sum() == len(y):
        raise ValueError(
            f"second stage: need positive and negative candidates (got {int(y.sum())} of {len(y)})"
        )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    det_algo = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    net = Stage2Net()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, ft, yt = torch.from_numpy(x), torch.from_numpy(f), torch.from_numpy(y.astype(np.float32))
    lossf = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y) - y.sum()) / y.sum() / 4.0))
    try:
        for ep in range(epochs):
            net.train()
            perm, total = rng.permutation(len(y)), 0.0
            for b in range(0, len(y), batch):
                i = torch.from_numpy(perm[b : b + batch])
                loss = lossf(net(_augment(xt[i], rng), ft[i]), yt[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(i)
            sched.step()
            if log is not None:
                log(f"second stage epoch {ep + 1}/{epochs}: loss {total / len(y):.4f}")
    finally:
        torch.use_deterministic_algorithms(det_algo)
    return net.eval()


# ------------------------------------------------------------------------------------------ on disk
def load_stage2(folder: Any) -> Stage2 | None:
    """The second stage of a model folder (:func:`cmbfe.modelfolder.read_stage2`), or None when it has none;
    InputError naming the file when the weights do not fit :class:`Stage2Net`."""
    from cmbfe import modelfolder
    from cmbfe.errors import InputError

    got = modelfolder.read_stage2(folder)
    if got is None:
        return None
    state, meta = got
    net = Stage2Net(int(meta.get("width", 8)))
    try:
        net.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise InputError(
            f"{folder}/{modelfolder.STAGE2}: weights do not match the second stage "
            f"({str(e).splitlines()[0][:200]})"
        ) from None
    ops = meta.get("operating_points")
    if not isinstance(ops, dict) or not all(
        isinstance(ops.get(o), dict) and "threshold" in ops[o] for o in OPERATING_POINTS
    ):
        raise InputError(
            f"{folder}/{modelfolder.META}: stage2 entry lacks the operating points "
            f"{', '.join(OPERATING_POINTS)}"
        )
    return Stage2(net.eval(), meta)
