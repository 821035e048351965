"""The detector ``cmbfe detect`` runs: a model folder (:mod:`cmbfe.modelfolder`) loaded with its operating
threshold and the geometry of its training slices, and its second stage when the folder has one
(:mod:`cmbfe.detect.stage2`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmbfe import config as C
from cmbfe import modelfolder
from cmbfe.datadir import DataDir
from cmbfe.errors import ConfigError, InputError

FALLBACK_THRESHOLD = 0.5  # a run folder stores no threshold


@dataclass
class Detector:
    """A loaded detector: the network, its training config, the operating threshold and the model card."""

    model: nn.Module
    cfg: C.Config
    threshold: float
    threshold_source: str  # "model" (stored, chosen on val) | "--threshold" | "fallback"
    meta: dict[str, Any] = field(default_factory=dict)  # detect.json of an exported model ({} for a run)
    path: Path | None = None
    pixel_spacing_mm: tuple[float, float] | None = None  # (dy, dx) of the training slices
    matrix: int | None = None  # side of the (square) training slices in px
    card: str = ""  # the model card (README.md) text of an exported model
    stage2: Any = None  # cmbfe.detect.stage2.Stage2, or None: the detector alone at ``threshold``
    operating_point: str | None = None  # the second stage's operating point in use (None without one)

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or (self.path.name if self.path else "model"))


def _training_geometry(cfg: C.Config) -> tuple[tuple[float, float] | None, int | None]:
    """(pixel spacing, matrix) of a run's training slices from its PRE folder, when it is on this machine."""
    try:
        g = DataDir(cfg.pre_path()).training_geometry("train")
    except (InputError, OSError):
        return None, None
    return g.pixel_spacing_mm, g.matrix


def load_detector(path: str | Path | None = None, *, threshold: float | None = None,
                  device: torch.device | str = "cpu", operating_point: str | None = None) -> Detector:
    """Load an exported model (``models/``: ``model.pt``, ``config.yaml``, ``detect.json``, ``README.md``) or
    any training run folder (``config.yaml`` + ``model.pt``; a ``.pt`` file stands for its folder) with
    :func:`cmbfe.modelfolder.load`.

    ``threshold`` overrides the stored one; a run folder without one uses 0.5 (``threshold_source``
    ``fallback``, the report says so). A folder with a second stage (``stage2.pt``) keeps the candidates
    whose second-stage probability reaches ``operating_point`` (``screening`` | ``balanced``; default the
    stored default); ``threshold`` given, the detector runs alone at that threshold (as without a second
    stage). Errors (InputError / ConfigError, one line): missing files, weights
    that do not load, weights that do not match the config.
    """
    hint = (" (no model is shipped until `make reproduce` exports one; pass --model RUN_FOLDER)"
            if path is None else "")
    mf = modelfolder.load(modelfolder.DEFAULT_DIR if path is None else path, device=device, missing_hint=hint)
    if torch.device(device).type == "cpu":
        mf.model.to(memory_format=torch.channels_last)  # ~25 % faster convolutions on CPU (oneDNN)
    geometry = mf.training_geometry()
    spacing, matrix = geometry if geometry is not None else _training_geometry(mf.cfg)
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
        thr, src = float(threshold), "--threshold"
    elif mf.meta.get("threshold") is not None:
        thr, src = float(mf.meta["threshold"]), "model"
    else:
        thr, src = FALLBACK_THRESHOLD, "fallback"
    from cmbfe.detect.stage2 import OPERATING_POINTS, load_stage2

    if operating_point is not None and operating_point not in OPERATING_POINTS:
        raise ConfigError(f"--operating-point must be one of {', '.join(OPERATING_POINTS)}, "
                          f"got {operating_point}")
    st = load_stage2(mf.path) if threshold is None else None
    if st is None and operating_point is not None:
        raise InputError(f"{mf.path}: --operating-point needs a model folder with a second stage (stage2.pt)")
    op = (operating_point or st.meta.get("default_operating_point", "balanced")) if st is not None else None
    return Detector(mf.model, mf.cfg, thr, src, mf.meta, mf.path, spacing, matrix, mf.card, st, op)
