"""``RUN/checkpoint.pt``: the training state written atomically and put back for an exact ``--resume``.

A checkpoint holds ``iteration``, ``model`` (the detector's state dict), ``optimizer``, ``scheduler``,
``scaler`` (AMP), ``ema`` (when ``train.ema`` is on), ``rng`` (torch/numpy/python/CUDA RNG states of every
DDP rank, as tensors and plain types so that ``torch.load(weights_only=True)`` reads them), ``sampler``
(position of the data stream), ``elapsed_s`` (training seconds so far) and ``config`` (the run's
configuration; a resume with a different one is refused, except the keys in :data:`RESUME_FREE`).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

from cmbfe import config as C
from cmbfe.utils import atomic_write_bytes

# train.* keys that may differ between a run and its --resume (they do not change the result). Not
# train.val_subset: the weights do not depend on it, but val.csv would switch mid-run from one slice set to
# another, and the convergence rule compares its values over the last 20 % of training
RESUME_FREE = {"workers", "device", "tensorboard", "log_every", "checkpoint_every", "val_every", "cache"}
_RESUME_FREE_SECTIONS = {"notebooks", "study", "profile", "holdout"}  # they do not change training


def rng_state() -> dict[str, Any]:
    """torch/numpy/python RNG states as tensors and plain types (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    np_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
    np_state |= {"has_gauss": int(has_gauss), "cached": float(cached)}
    py_state = {"version": int(version), "state": torch.tensor(pystate, dtype=torch.int64), "gauss": gauss}
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np_state, "python": py_state}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(st["torch"].cpu())
    n = st["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = st["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file + ``os.replace``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def resume_check(saved: dict[str, Any], cfg: C.Config, path: Path) -> None:
    """``ConfigError`` naming every key where the checkpoint's config ``saved`` and ``cfg`` differ (except
    :data:`RESUME_FREE` and the sections that do not change training: notebooks, study, profile, holdout).
    A key or section the checkpoint lacks (written before it existed) counts as its default value: a new key's
    default is what the code did before it."""
    now, defaults = cfg.to_dict(), C.Config().to_dict()
    diff = []
    for sec in sorted((set(saved) | set(now)) - _RESUME_FREE_SECTIONS):
        a, b = saved.get(sec, defaults.get(sec)), now.get(sec)
        if isinstance(a, dict) and isinstance(b, dict):
            a = {**defaults[sec], **a} if isinstance(defaults.get(sec), dict) else a
            diff += [
                f"{sec}.{k}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k) and not (sec == "train" and k in RESUME_FREE)
            ]
        elif a != b:
            diff.append(sec)
    if diff:
        raise C.ConfigError(f"{path}: cannot resume, configuration differs in {', '.join(diff)}")


@dataclass
class TrainState:
    """What a checkpoint saves besides RNG states: the detector (not its DDP wrapper), optimizer, LR
    scheduler, AMP scaler and the weight average (``None`` when ``train.ema`` is 0)."""

    model: nn.Module
    optimizer: Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None = None


class Checkpointer:
    """``RUN/checkpoint.pt`` of one run (config ``cfg``) for a process of DDP ``rank`` among ``world`` that
    trains on ``device``: :meth:`save` writes it (atomic), :meth:`restore` puts it back."""

    def __init__(self, path: Path, cfg: C.Config, *, device: torch.device, rank: int = 0, world: int = 1):
        self.path, self.cfg, self.device, self.rank, self.world = path, cfg, device, rank, world

    def restore(self, st: TrainState) -> tuple[int, float]:
        """Load the checkpoint into ``st`` and this rank's RNG states (the configuration must match);
        return (iteration, training seconds)."""
        ck = torch.load(self.path, map_location=self.device, weights_only=True)
        resume_check(ck["config"], self.cfg, self.path)
        st.model.load_state_dict(ck["model"])
        st.optimizer.load_state_dict(ck["optimizer"])
        st.scheduler.load_state_dict(ck["scheduler"])
        if st.ema is not None:
            st.ema.load_state_dict(ck["ema"])
        if ck.get("scaler"):
            st.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"][min(self.rank, len(ck["rng"]) - 1)])
        return int(ck["iteration"]), float(ck.get("elapsed_s", 0.0))

    def save(self, st: TrainState, it: int, seconds: float) -> None:
        """Write the state after iteration ``it`` (every rank takes part: the RNG states are gathered; rank 0
        writes)."""
        rng: list[Any] = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if self.rank == 0:
            state = {"iteration": it, "model": st.model.state_dict(), "optimizer": st.optimizer.state_dict()}
            state |= {"scheduler": st.scheduler.state_dict(), "scaler": st.scaler.state_dict(), "rng": rng}
            if st.ema is not None:
                state["ema"] = st.ema.state_dict()
            state |= {"sampler": {"batch": it, "seed": self.cfg.train.seed, "world_size": self.world}}
            state |= {"elapsed_s": seconds, "config": self.cfg.to_dict()}
            save_torch(state, self.path)
