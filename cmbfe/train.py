"""``cmbfe train``: iteration-based SSD training (Adam + step LR), atomic checkpoints, exact resume, DDP.

Usage::

    cmbfe train --params smoke --out RUN [--set train.iterations=200 ...] [--data PRE] [--resume]
                [--stop-after N] [--no-progress]
    torchrun --nproc_per_node=4 -m cmbfe.cli train --params paper --out RUN     # DDP (docs/training.md)

Writes ``RUN/config.yaml`` (first), ``RUN/checkpoint.pt`` (every ``train.checkpoint_every`` iterations and at
the end; temp file + ``os.replace``), ``RUN/log.csv`` (every ``train.log_every`` iterations: iteration, loss,
bbox_loss, cls_loss, lr, images_per_s, seconds), ``RUN/val.csv`` (val-split metrics every ``train.val_every``
iterations and at the end), ``RUN/model.pt`` (final ``state_dict``) and ``RUN/model.json``
(``model.describe()`` + timings).

Schedule: Adam(lr, weight_decay); the learning rate is multiplied by ``lr_gamma`` at each fraction of
``iterations`` in ``lr_steps`` (paper: 1e-3, x0.1 at 80k and 100k of 120k). ``model.set_progress(it /
iterations)`` drives the FE alpha schedule. ``train.batch_size`` is the global batch (split over DDP ranks).

Reproducibility: on CPU the run is deterministic (``torch.use_deterministic_algorithms(True,
warn_only=True)``; set ``CMBFE_THREADS`` to fix torch's intra-op threads, as thread count can change float
reductions). Data order and augmentation depend only on ``(train.seed, draw position)`` (see
:mod:`cmbfe.data`), the checkpoint stores model, optimizer, scheduler, AMP scaler, the torch/numpy/python RNG
states and the iteration, so ``--resume`` reaches bit-identical weights to an uninterrupted CPU run.
AMP (float16 autocast + GradScaler) and channels_last are used on CUDA only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cmbfe import config as C
from cmbfe.augment import build_augment
from cmbfe.data import InfiniteSampler, SliceDataset, collate_fn
from cmbfe.errors import InputError
from cmbfe.evaluate import dets_from_coco, evaluate, gt_from_coco
from cmbfe.models import build_model
from cmbfe.predict import predict, resolve_device
from cmbfe.runtime import apply_thread_env
from cmbfe.utils import CSVLogger, atomic_write_bytes, atomic_write_json, seed_everything

LOG_FIELDS = ["iteration", "loss", "bbox_loss", "cls_loss", "lr", "images_per_s", "seconds"]
VAL_METRICS = ["ap_voc", "ap_voc07", "sensitivity", "precision", "precision_at_sensitivity_0.9"]
VAL_FIELDS = ["iteration", *VAL_METRICS, "fp_per_cmb", "froc_mean", "n_dets", "seconds"]
# train.* keys that may differ between a run and its --resume (they do not change the result)
RESUME_FREE = {"workers", "device", "tensorboard", "log_every", "checkpoint_every", "val_every", "cache"}


# ------------------------------------------------------------------------------------------- helpers
def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (1 process: ``(0, 1, 0)``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def split_losses(losses: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, bbox, cls)`` from the model's loss dict (keys containing bbox/reg/loc vs cls/class/conf)."""
    total = sum(losses.values())
    zero = total.detach() * 0
    bbox = sum((v.detach() for k, v in losses.items() if any(s in k for s in ("bbox", "reg", "loc"))), zero)
    cls = sum((v.detach() for k, v in losses.items() if any(s in k for s in ("cls", "class", "conf"))), zero)
    return total, bbox, cls


def _train_step(
    model: nn.Module,
    images: list[Tensor],
    targets: list[dict],
    optimizer: Optimizer,
    scaler: torch.amp.GradScaler,
    amp: bool,
    device: torch.device,
    grad_clip: float = 0.0,
) -> tuple[Tensor, ...]:
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
        losses = model(images, targets)
        total, bbox, cls = split_losses(losses)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return total.detach(), bbox, cls


def step_time(
    model: nn.Module,
    images: list[Tensor],
    targets: list[dict],
    optimizer: Optimizer,
    repeats: int = 5,
    *,
    warmup: int = 1,
    amp: bool = False,
) -> dict[str, Any]:
    """Seconds per training step (forward + backward + optimizer) on one fixed batch (paper Table 3).

    Runs ``warmup`` untimed then ``repeats`` timed steps on the device of ``images`` (synchronising CUDA);
    returns ``{"median_s", "times_s", "batch", "images_per_s"}``. The steps update the model's weights.
    """
    device = images[0].device
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        _train_step(model, images, targets, optimizer, scaler, scaler.is_enabled(), device)
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        _train_step(model, images, targets, optimizer, scaler, scaler.is_enabled(), device)
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"median_s": med, "times_s": times, "batch": len(images), "images_per_s": len(images) / med}


def lr_factor(it: int, tc: C.TrainConfig) -> float:
    """LR multiplier at iteration ``it`` (0-based): linear warm-up from 1/100 over ``train.warmup``
    iterations, then ``step`` (x ``lr_gamma`` at each ``lr_steps`` fraction) or ``cosine`` (1 -> ``lr_min`` by
    the fraction ``cosine_end`` of training, then constant; defaults: 0 at the last iteration)."""
    if tc.schedule == "cosine":
        span = max(1, round(tc.cosine_end * tc.iterations) - 1 - tc.warmup)
        c = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, it - tc.warmup) / span)))
        f = tc.lr_min + (1 - tc.lr_min) * c
    else:
        miles = sorted({max(1, round(s * tc.iterations)) for s in tc.lr_steps})
        f = tc.lr_gamma ** sum(it >= m for m in miles)
    if tc.warmup and it < tc.warmup:
        f *= 0.01 + 0.99 * it / tc.warmup
    return f


def build_optimizer(model: nn.Module, tc: C.TrainConfig) -> tuple[Optimizer, LRScheduler]:
    """Adam + the LR schedule of :func:`lr_factor`, stepped per iteration.

    The paper's plain step schedule (``schedule: step``, ``warmup: 0``) is a ``MultiStepLR`` at
    ``round(f * iterations)`` for ``f`` in ``lr_steps``; anything else a ``LambdaLR`` over :func:`lr_factor`."""
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.schedule == "step" and not tc.warmup:
        miles = sorted({max(1, round(f * tc.iterations)) for f in tc.lr_steps})
        return opt, MultiStepLR(opt, milestones=miles, gamma=tc.lr_gamma)
    return opt, LambdaLR(opt, lambda it: lr_factor(it, tc))


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s parameters and buffers (``None`` when ``decay`` is 0)."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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


def _resume_check(saved: dict[str, Any], cfg: C.Config, path: Path) -> None:
    now = cfg.to_dict()
    diff = []
    for sec in sorted(set(saved) | set(now)):
        a, b = saved.get(sec), now.get(sec)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [
                f"{sec}.{k}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k) and not (sec == "train" and k in RESUME_FREE)
            ]
        elif a != b and sec not in ("notebooks", "study", "profile"):
            diff.append(sec)
    if diff:
        raise C.ConfigError(f"{path}: cannot resume, configuration differs in {', '.join(diff)}")


def validate_split(
    model: nn.Module, dataset: SliceDataset, cfg: C.Config, device: torch.device
) -> dict[str, Any]:
    """Predict on ``dataset`` (the val split) and return its metrics (``cmbfe.evaluate``) with the COCO results
    under ``"detections"``."""
    kw = {"input": dataset.input, "batch_size": cfg.train.batch_size, "device": device, "dataset": dataset}
    dets = predict(model, dataset.pre_dir, dataset.split, **kw)
    gt = gt_from_coco(dataset.coco, f"{dataset.pre_dir}/annotations/{dataset.split}.json")
    res = evaluate(
        gt, dets_from_coco(dets, gt), match=cfg.eval.match, iou=cfg.eval.iou, radius_mm=cfg.eval.radius_mm
    )
    return {**res["metrics"], "detections": dets}


def window_px(model_cfg: C.ModelConfig, ds: SliceDataset) -> int:
    """Training-window side in slice pixels for ``model.train_crop`` (0: whole slices).

    A window of ``train_crop * W / size`` px is resized to ``train_crop`` network px, the pixel scale of a
    whole ``W``-px slice at ``size``. All images of the split must share one square size.
    """
    if not model_cfg.train_crop:
        return 0
    sizes = {(int(im["width"]), int(im["height"])) for im in ds.images}
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise InputError(f"{ds.pre_dir}/annotations/{ds.split}.json: model.train_crop needs square slices of "
                         f"one size, found {sorted(sizes)[:4]}")
    side = next(iter(sizes))[0]
    return max(1, round(model_cfg.train_crop * side / model_cfg.size))


def _csv_value(v: Any) -> Any:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _to(targets: list[dict], device: torch.device) -> list[dict]:
    return [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
        for t in targets
    ]


# ------------------------------------------------------------------------------------------- fit
@dataclass
class Session:
    """Where this process trains: its DDP rank, the world size, the device, AMP on or off."""

    rank: int
    world: int
    local: int
    device: torch.device
    amp: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def training_session(tc: C.TrainConfig) -> Iterator[Session]:
    """Set up DDP (under torchrun), torch's threads (``CMBFE_THREADS``) and determinism (CPU) or cuDNN
    autotuning (CUDA) for one training; restore threads and determinism and end DDP on exit."""
    rank, world, local = dist_env()
    device = resolve_device(tc.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if tc.batch_size % world:
            raise C.ConfigError(f"train.batch_size {tc.batch_size} is not divisible by WORLD_SIZE {world}")
    threads_before = apply_thread_env()
    det_before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield Session(rank, world, local, device, amp=tc.amp and device.type == "cuda")
    finally:
        torch.use_deterministic_algorithms(det_before)
        torch.set_num_threads(threads_before)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Clock:
    """Training seconds: those of earlier calls (``elapsed``, from the checkpoint) plus this call's."""

    def __init__(self, elapsed: float = 0.0) -> None:
        self.elapsed, self.t0 = elapsed, time.perf_counter()

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.t0


@dataclass
class Parts:
    """Everything a training loop runs on, built by :func:`build_parts`."""

    cfg: C.Config
    out: Path
    session: Session
    core: nn.Module  # the detector
    model: nn.Module  # ``core``, or its DDP wrapper
    optimizer: Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    val_ds: SliceDataset | None
    batches: Iterator[tuple[list[Tensor], list[dict]]]
    checkpointer: Checkpointer
    fixed: list[tuple[Tensor, dict]] | None = None  # a fixed training batch for the FE train/test gap (fe.enabled)
    start: int = 0  # first iteration of this call
    elapsed: float = 0.0  # training seconds of earlier calls

    def final_model(self) -> nn.Module:
        """What is validated and saved: the EMA weights when ``train.ema`` is on, else the detector."""
        return self.core if self.ema is None else self.ema.module


class Checkpointer:
    """``RUN/checkpoint.pt`` (atomic): model, optimizer, scheduler, AMP scaler, EMA, every rank's RNG states,
    the iteration and the training seconds; :meth:`restore` puts them back for an exact resume."""

    def __init__(self, path: Path, cfg: C.Config, session: Session) -> None:
        self.path, self.cfg, self.session = path, cfg, session

    def restore(self, p: Parts) -> tuple[int, float]:
        """Load the checkpoint into ``p`` (the configuration must match); return (iteration, seconds)."""
        ck = torch.load(self.path, map_location=self.session.device, weights_only=True)
        _resume_check(ck["config"], self.cfg, self.path)
        p.core.load_state_dict(ck["model"])
        p.optimizer.load_state_dict(ck["optimizer"])
        p.scheduler.load_state_dict(ck["scheduler"])
        if p.ema is not None:
            p.ema.load_state_dict(ck["ema"])
        if ck.get("scaler"):
            p.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"][min(self.session.rank, len(ck["rng"]) - 1)])
        return int(ck["iteration"]), float(ck.get("elapsed_s", 0.0))

    def save(self, p: Parts, it: int, seconds: float) -> None:
        """Write the state after iteration ``it`` (every rank takes part: the RNG states are gathered)."""
        s = self.session
        rng = [None] * s.world
        if s.world > 1:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if s.main:
            state = {"iteration": it, "model": p.core.state_dict(), "optimizer": p.optimizer.state_dict()}
            state |= {"scheduler": p.scheduler.state_dict(), "scaler": p.scaler.state_dict(), "rng": rng}
            if p.ema is not None:
                state["ema"] = p.ema.state_dict()
            state |= {"sampler": {"batch": it, "seed": self.cfg.train.seed, "world_size": s.world}}
            state |= {"elapsed_s": seconds, "config": self.cfg.to_dict()}
            save_torch(state, self.path)


def build_parts(cfg: C.Config, out: Path, pre: Path, s: Session, *, resume: bool) -> Parts:
    """Seed, then build the data sets, the detector, optimizer, LR schedule, AMP scaler and EMA; restore them
    from ``out/checkpoint.pt`` when resuming; write ``out/config.yaml``; wrap in DDP; start the data stream at
    the first iteration of this call."""
    tc = cfg.train
    seed_everything(tc.seed + s.rank)
    aug = build_augment(cfg.augment) if cfg.augment.enabled else None
    kw = {"input": cfg.model.input, "cache": tc.cache}
    ds = SliceDataset(pre, "train", augment=aug, negatives_ratio=tc.negatives_ratio, seed=tc.seed, **kw)
    ds.window = window_px(cfg.model, ds)
    val_ds = None
    if s.main and (pre / "annotations" / "val.json").is_file():
        val_ds = SliceDataset(pre, "val", **kw)
    elif s.main:
        warnings.warn(f"{pre}/annotations/val.json not found: no validation", stacklevel=3)
    core = build_model(cfg.model, cfg.fe).to(s.device)
    if s.device.type == "cuda" and tc.channels_last:
        core = core.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(core, tc)
    p = Parts(cfg, out, s, core, core, optimizer, scheduler, torch.amp.GradScaler(s.device.type, enabled=s.amp),
              build_ema(core, tc.ema), val_ds, iter(()), Checkpointer(out / "checkpoint.pt", cfg, s))
    if resume and p.checkpointer.path.is_file():
        p.start, p.elapsed = p.checkpointer.restore(p)
    elif resume and s.main:
        warnings.warn(f"{p.checkpointer.path} not found: starting from iteration 0", stacklevel=3)
    if s.main:
        out.mkdir(parents=True, exist_ok=True)
        C.dump(cfg, out / "config.yaml")
    if s.world > 1:
        p.model = nn.parallel.DistributedDataParallel(core, device_ids=[s.local] if s.device.type == "cuda" else None)
    sampler = InfiniteSampler(len(ds), tc.batch_size // s.world, seed=tc.seed, rank=s.rank, world_size=s.world,
                              start_batch=p.start)
    gen = torch.Generator().manual_seed(tc.seed)  # keeps DataLoader off the global RNG
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn, generator=gen, num_workers=tc.workers,
                        persistent_workers=tc.workers > 0, pin_memory=s.device.type == "cuda")
    p.batches = iter(loader)
    if cfg.fe.enabled and s.main and tc.val_every >= 0:
        p.fixed = fe_gap_batch(ds)
    return p


FE_GAP_BATCH = 8


def fe_gap_batch(ds: SliceDataset, n: int = FE_GAP_BATCH) -> list[tuple[Tensor, dict]]:
    """The fixed batch of :func:`fe_gap`: the first ``n`` CMB slices of the training pool, drawn with seeds
    ``0..n-1`` (augmentation and window as in training; seeded draws leave the training stream's RNG untouched)."""
    pos = [i for i, im in enumerate(ds.images) if ds._has_cmb(im)][:n]
    return [ds[(i, i)] for i in pos]
FE_GAP_FIELDS = ["iteration", "alpha", "loss_fe_on", "loss_fe_off", "cls_fe_on", "cls_fe_off", "bbox_fe_on",
                 "bbox_fe_off"]


@torch.no_grad()
def fe_gap(core: nn.Module, fixed: list[tuple[Tensor, dict]], device: torch.device) -> dict[str, float]:
    """Training losses of a copy of ``core`` on a fixed batch with FE on (as in training) and off (what the
    network meets at test time), in train mode (batch statistics; the copy keeps ``core``'s BatchNorm buffers
    and RNG-free state untouched). A gap that stays large means the heads rely on the training-only FE."""
    model = copy.deepcopy(core).train()
    images = [im.to(device) for im, _ in fixed]
    targets = _to([t for _, t in fixed], device)
    row: dict[str, float] = {"alpha": float(model.alpha)}
    for on in (True, False):
        model.fe_cfg.enabled = on
        total, bbox, cls = split_losses(model(images, targets))
        tag = "on" if on else "off"
        row |= {f"loss_fe_{tag}": float(total), f"bbox_fe_{tag}": float(bbox), f"cls_fe_{tag}": float(cls)}
    return row


class RunLogs:
    """``RUN/log.csv``, ``RUN/val.csv`` (unless ``val_every`` is -1) and TensorBoard (``train.tensorboard``),
    on the main process only; appended to on resume. A context manager that closes them."""

    def __init__(self, out: Path, tc: C.TrainConfig, main: bool, append: bool, fe: bool = False) -> None:
        self.log = self.val = self.tb = self.fe_gap = None
        if not main:
            return
        self.log = CSVLogger(out / "log.csv", LOG_FIELDS, append=append)
        if tc.val_every >= 0:  # -1: never validated, so no val.csv
            self.val = CSVLogger(out / "val.csv", VAL_FIELDS, append=append)
            if fe:  # FE runs: losses on a fixed batch with FE on / off at every validation
                self.fe_gap = CSVLogger(out / "fe_gap.csv", FE_GAP_FIELDS, append=append)
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                warnings.warn("tensorboard is not installed: train.tensorboard ignored", stacklevel=3)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for closable in (self.log, self.val, self.tb, self.fe_gap):
            if closable is not None:
                closable.close()


def run_validation(p: Parts, logs: RunLogs, it: int) -> None:
    """Validate :meth:`Parts.final_model` on the val split into ``val.csv`` (main process; others wait)."""
    if p.val_ds is not None:
        tv = time.perf_counter()
        m = validate_split(p.final_model(), p.val_ds, p.cfg, p.session.device)
        row = {k: m.get(k) for k in VAL_FIELDS}
        row.update(iteration=it, seconds=round(time.perf_counter() - tv, 3), n_dets=m.get("n_dets"))
        logs.val.log({k: _csv_value(v) for k, v in row.items()})
        if it == p.cfg.train.iterations:  # the final model's val detections, as study.ensure_predictions caches
            atomic_write_json(p.out / f"dets_{p.val_ds.split}.json", m["detections"], indent=None)
        if logs.tb is not None:
            logs.tb.add_scalar("val/ap_voc", m["ap_voc"], it)
        if logs.fe_gap is not None and p.fixed:
            logs.fe_gap.log({"iteration": it, **fe_gap(p.core, p.fixed, p.session.device)})
    if p.session.world > 1:
        dist.barrier()


def _log_window(p: Parts, logs: RunLogs, acc: Tensor, n: int, done: int, seconds: float, window_s: float) -> dict:
    """Mean losses of the last ``n`` iterations (averaged over DDP ranks) into ``log.csv``; the row."""
    if p.session.world > 1:
        dist.all_reduce(acc)
        acc /= p.session.world
    vals = (acc / n).tolist()
    if not math.isfinite(vals[0]):
        raise FloatingPointError(f"training loss is {vals[0]} at iteration {done}")
    row = dict(zip(LOG_FIELDS[:4], [done, *vals]), lr=p.optimizer.param_groups[0]["lr"])
    row["images_per_s"] = round(n * p.cfg.train.batch_size / max(window_s, 1e-9), 3)
    row["seconds"] = round(seconds, 3)
    if p.session.main:
        logs.log.log(row)
        if logs.tb is not None:
            for k in ("loss", "bbox_loss", "cls_loss", "lr", "images_per_s"):
                logs.tb.add_scalar(f"train/{k}", row[k], done)
    return row


def train_loop(p: Parts, logs: RunLogs, clock: Clock, end: int, progress: bool) -> list[float]:
    """Iterations ``p.start .. end - 1``: FE progress, training step (AMP, clipping), LR schedule, EMA; a log
    row every ``log_every`` and at ``end``, checkpoints every ``checkpoint_every``, validation every
    ``val_every``. Returns the seconds of each step."""
    tc, s = p.cfg.train, p.session
    bar = tqdm(total=tc.iterations, initial=p.start, disable=not (progress and s.main), desc="train",
               dynamic_ncols=True)
    acc = torch.zeros(3, device=s.device)
    n_acc, t_win = 0, clock.t0
    step_times: list[float] = []
    p.model.train()
    for it in range(p.start, end):
        p.core.set_progress(it / tc.iterations)
        ts = time.perf_counter()
        images, targets = next(p.batches)
        images = [im.to(s.device, non_blocking=True) for im in images]
        total, bbox, cls = _train_step(p.model, images, _to(targets, s.device), p.optimizer, p.scaler, s.amp,
                                       s.device, tc.grad_clip)
        p.scheduler.step()
        if p.ema is not None:
            p.ema.update_parameters(p.core)
        acc += torch.stack([total, bbox, cls]).float()
        n_acc += 1
        step_times.append(time.perf_counter() - ts)
        done = it + 1
        if (tc.log_every > 0 and done % tc.log_every == 0) or done == end:
            now = time.perf_counter()
            row = _log_window(p, logs, acc, n_acc, done, clock.seconds(), now - t_win)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.1e}")
            acc.zero_()
            n_acc, t_win = 0, now
        bar.update(1)
        if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < end:
            p.checkpointer.save(p, done, clock.seconds())
        if tc.val_every > 0 and done % tc.val_every == 0 and done < tc.iterations:
            run_validation(p, logs, done)
    bar.close()
    return step_times


def save_final(p: Parts, seconds: float, step_times: list[float], end: int) -> Path:
    """``RUN/model.pt`` (:meth:`Parts.final_model`'s weights) and ``RUN/model.json`` (architecture, timings)."""
    tc, s = p.cfg.train, p.session
    save_torch(p.final_model().state_dict(), p.out / "model.pt")
    med = statistics.median(step_times) if step_times else None
    timings = {"train_s": round(seconds, 3), "iterations": tc.iterations, "this_call": end - p.start}
    timings |= {"step_s_median": med, "images_per_s": tc.batch_size / med if med else None}
    timings |= {"batch_size": tc.batch_size, "world_size": s.world, "device": str(s.device), "amp": s.amp}
    info = {"model": p.core.describe(), "parameters": sum(q.numel() for q in p.core.parameters())}
    info |= {"timings": timings, "config_hash": p.cfg.hash(), "torch": torch.__version__}
    atomic_write_json(p.out / "model.json", info)
    return p.out / "model.pt"


def fit(
    cfg: C.Config,
    out_dir: Path | str,
    *,
    resume: bool = False,
    progress: bool = True,
    data: Path | str | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train ``build_model(cfg.model, cfg.fe)`` on ``data`` (default ``cfg.pre_path()``) in ``out_dir``.

    ``resume`` continues from ``out_dir/checkpoint.pt`` (configuration must match, except the train keys in
    ``RESUME_FREE``). ``stop_after`` ends the call after that many iterations in total (an interruption: a
    checkpoint is written, no final weights) and returns the checkpoint path. Returns ``out_dir/model.pt``.
    The parts: :func:`training_session` (DDP, threads, determinism), :func:`build_parts` (data, model,
    optimizer, resume state), :func:`train_loop`, :class:`Checkpointer`, :func:`save_final`.
    """
    out, tc = Path(out_dir), cfg.train
    pre = Path(data) if data is not None else cfg.pre_path()
    with training_session(tc) as s:
        p = build_parts(cfg, out, pre, s, resume=resume)
        with RunLogs(out, tc, s.main, append=p.start > 0, fe=cfg.fe.enabled) as logs:
            clock = Clock(p.elapsed)
            end = tc.iterations if stop_after is None else min(tc.iterations, stop_after)
            step_times = train_loop(p, logs, clock, end, progress)
            if end > p.start or p.start == 0:
                p.checkpointer.save(p, end, clock.seconds())
            if end < tc.iterations:
                return p.checkpointer.path
            if tc.val_every >= 0:
                run_validation(p, logs, tc.iterations)
            if s.main:
                save_final(p, clock.seconds(), step_times, end)
    return out / "model.pt"


def main(argv: list[str] | None = None) -> int:
    """``cmbfe train --params FILE [--set key=value ...] --out RUN [--resume] [--data PRE]``."""
    ap = argparse.ArgumentParser(prog="cmbfe train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", required=True, help="params YAML file or profile name (smoke/default/paper)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.lr=0.0001")
    ap.add_argument("--out", required=True, type=Path, help="run folder")
    ap.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    ap.add_argument("--data", type=Path, default=None, help="PRE folder (default: <data_dir>/pre)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--stop-after", type=int, metavar="N", help="stop at iteration N (checkpoint; then --resume)"
    )
    args = ap.parse_args(argv)
    cfg = C.load(args.params, args.set)
    t0 = time.perf_counter()
    kw = {"resume": args.resume, "progress": not args.no_progress, "stop_after": args.stop_after}
    path = fit(cfg, args.out, data=args.data, **kw)
    if dist_env()[0] == 0:
        print(f"cmbfe train: {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
