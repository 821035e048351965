"""The model folder, the one home of its format: a trained detector on disk, written and read here.

A folder holds:

- ``model.pt`` (:data:`WEIGHTS`): the network's state dict (a training checkpoint ``{"model": state, ...}``
  is accepted too), loaded with ``torch.load(weights_only=True)``;
- ``config.yaml`` (:data:`CONFIG`): the training configuration (:func:`cmbfe.config.load`);
- ``detect.json`` (:data:`META`, exported models only, format :data:`FORMAT`): name, operating threshold and
  the rule that chose it, test metrics, training-data geometry (``training_data.pixel_spacing_mm`` (dy, dx)
  mm, ``training_data.matrix`` px), provenance;
- ``README.md`` (:data:`CARD`, exported models only): the model card;
- ``stage2.pt`` (:data:`STAGE2`, optional): the second stage's state dict (:mod:`cmbfe.detect.stage2`), its
  settings and operating points in ``detect.json``'s ``stage2`` entry (:func:`write_stage2`,
  :func:`read_stage2`).

A training run folder (:func:`cmbfe.train.fit`) is a model folder with the first two files;
:func:`cmbfe.detect.export.export_model` builds an exported one and writes it with :func:`write`.
:func:`load` is the one loader (``cmbfe detect``, ``cmbfe predict`` and the study use it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmbfe import config as C
from cmbfe.errors import InputError
from cmbfe.utils import atomic_path, atomic_write_json, atomic_write_text, json_safe

WEIGHTS = "model.pt"
CONFIG = "config.yaml"
META = "detect.json"
CARD = "README.md"
STAGE2 = "stage2.pt"
FORMAT = "cmbfe-detector/1"
DEFAULT_DIR = C.REPO_ROOT / "models"  # where the study ships the committed profile's model


@dataclass
class ModelFolder:
    """A loaded model folder: the network (``eval()``, on the requested device) and what came with it."""

    model: nn.Module
    cfg: C.Config
    path: Path  # the folder
    meta: dict[str, Any] = field(default_factory=dict)  # detect.json ({} for a training run folder)
    card: str = ""  # README.md of an exported model ("" otherwise)

    def training_geometry(self) -> tuple[tuple[float, float], int] | None:
        """``((dy, dx) mm, matrix px)`` of the training slices as ``detect.json`` records them, else None."""
        td = self.meta.get("training_data") or {}
        if not td.get("pixel_spacing_mm"):
            return None
        dy, dx = (float(v) for v in td["pixel_spacing_mm"])
        return (dy, dx), int(td["matrix"])


def locate(path: str | Path) -> tuple[Path, Path]:
    """``(folder, weights file)`` of a model folder or of its ``.pt`` file (which stands for its folder)."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".pt":
            raise InputError(f"{p}: not a model (expected a model folder, a training run folder or its "
                             ".pt file)")
        return p.parent, p
    return p, p / WEIGHTS


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``detect.json`` of ``folder`` ({} when there is none); InputError naming the file when it is not
    JSON."""
    path = Path(folder) / META
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def read_state(weights: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``weights`` (CPU tensors; ``weights_only=True``); InputError naming the file."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt or foreign file
        raise InputError(f"{weights}: cannot be loaded as PyTorch weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"{weights}: not a state dict of tensors")
    return state


def load(path: str | Path, *, device: torch.device | str = "cpu", missing_hint: str = "") -> ModelFolder:
    """Load a model folder (exported or a training run; a ``.pt`` file stands for its folder).

    The network is rebuilt from ``config.yaml`` (:func:`cmbfe.models.build_model`), its weights loaded, moved
    to ``device`` and put in ``eval()`` mode. Errors (InputError / ConfigError, one line naming the file):
    missing files (``missing_hint`` is appended), a config that does not validate, weights that do not load
    or do not match the config, a ``detect.json`` that is not JSON.
    """
    from cmbfe.models import build_model

    folder, weights = locate(path)
    cfg_path = folder / CONFIG
    if not folder.is_dir() or not weights.is_file() or not cfg_path.is_file():
        what = WEIGHTS if not weights.is_file() else CONFIG
        raise InputError(f"{folder}: {what} not found; not a model or training run folder "
                         f"({CONFIG} + {WEIGHTS}){missing_hint}")
    cfg = C.load(cfg_path)
    meta = read_meta(folder)
    state = read_state(weights)
    try:
        model = build_model(cfg.model, cfg.fe)
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(s.strip() for s in first[:3])
        raise InputError(f"{weights}: weights do not match {cfg_path.name} ({detail[:400]})") from None
    model.to(device).eval()
    card = (folder / CARD).read_text() if meta and (folder / CARD).is_file() else ""
    return ModelFolder(model, cfg, folder, meta, card)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The network of a model folder (:func:`load`), in ``eval()`` mode on ``device``."""
    return load(path, device=device).model


def write(out: str | Path, *, weights: str | Path, config: str | Path, meta: dict[str, Any],
          card: str) -> Path:
    """Write an exported model folder ``out`` (replaced atomically): copies of ``weights`` and ``config``,
    ``meta`` as ``detect.json`` (through :func:`json_safe`) and ``card`` as ``README.md``."""
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        shutil.copyfile(weights, tmp / WEIGHTS)
        shutil.copyfile(config, tmp / CONFIG)
        atomic_write_json(tmp / META, json_safe(meta))
        atomic_write_text(tmp / CARD, card)
    return out


def write_stage2(folder: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Add a second stage to an exported model folder: ``state`` as :data:`STAGE2` and ``meta`` as the
    ``stage2`` entry of ``detect.json`` (each file replaced atomically; the weights first)."""
    folder = Path(folder)
    if not (folder / META).is_file():
        raise InputError(f"{folder}: no {META}; a second stage goes into an exported model folder")
    tmp = folder / f".{STAGE2}.tmp"
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    tmp.replace(folder / STAGE2)
    atomic_write_json(folder / META, json_safe(read_meta(folder) | {"stage2": meta}))


def read_stage2(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(state dict, detect.json's stage2 entry)`` of a model folder, or None when it has no second stage
    (no :data:`STAGE2` or no ``stage2`` entry). InputError naming the file when the weights do not load."""
    folder = Path(folder)
    meta = read_meta(folder).get("stage2")
    if not (folder / STAGE2).is_file() or not isinstance(meta, dict):
        return None
    return read_state(folder / STAGE2), meta
