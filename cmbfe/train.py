"""``cmbfe train``: iteration-based SSD training (Adam; step or cosine LR with warm-up; optional EMA and
gradient clipping), atomic checkpoints, exact resume, DDP.

Usage::

    cmbfe train --params smoke --out RUN [--set train.iterations=200 ...] [--data PRE] [--resume]
                [--stop-after N] [--no-progress]
    torchrun --nproc_per_node=4 -m cmbfe.cli train --params paper --out RUN     # DDP (docs/training.md)

Writes ``RUN/config.yaml`` (first), ``RUN/checkpoint.pt`` (every ``train.checkpoint_every`` iterations and at
the end; temp file + ``os.replace``), ``RUN/log.csv`` (every ``train.log_every`` iterations: iteration, loss,
bbox_loss, cls_loss, lr, images_per_s, seconds), ``RUN/val.csv`` (val-split metrics every ``train.val_every``
iterations and at the end; with ``train.val_subset`` the in-loop rows are on a fixed subset of the val slices
(column ``subset`` 1, ``slices`` its size) and the end has two rows, the subset's then the whole split's
(``subset`` 0), from one prediction pass), ``RUN/model.pt`` (final ``state_dict``) and ``RUN/model.json``
(``model.describe()`` + timings).

Optimisation: Adam(lr, weight_decay), one LR-schedule step per iteration (:func:`lr_factor`):
``train.schedule: step`` multiplies the LR by ``lr_gamma`` at each fraction of ``iterations`` in ``lr_steps``
(paper: 1e-3, x0.1 at 80k and 100k of 120k), ``cosine`` decays it to ``lr * lr_min`` by the fraction
``cosine_end``; either after a linear warm-up of ``train.warmup`` iterations. ``train.grad_clip`` clips the
global gradient norm, ``train.ema`` validates and saves an exponential moving average of the weights.
``model.fe.set_progress(it / iterations)`` drives the FE alpha schedule. ``train.batch_size`` is the global
batch (split over DDP ranks). FE runs log the FE train/test gap (:mod:`cmbfe.fe_gap`) to ``RUN/fe_gap.csv``
at every validation. The checkpoint is :mod:`cmbfe.checkpoint`.

Reproducibility: on CPU the run is deterministic (``torch.use_deterministic_algorithms(True,
warn_only=True)``; set ``CMBFE_THREADS`` to fix torch's intra-op threads, as thread count can change float
reductions). Data order and augmentation depend only on ``(train.seed, draw position)`` (see
:mod:`cmbfe.data`), the checkpoint stores model, optimizer, scheduler, AMP scaler, the torch/numpy/python RNG
states and the iteration, so ``--resume`` reaches bit-identical weights to an uninterrupted CPU run.
AMP (float16 autocast + GradScaler) is used on CUDA only; channels_last on CUDA (``train.channels_last``)
and, with ``train.channels_last_cpu``, on CPU (off by default: it changes the float results).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cmbfe import config as C
from cmbfe.checkpoint import Checkpointer, TrainState, save_torch
from cmbfe.data import InfiniteSampler, SliceDataset, collate_fn, targets_to, training_dataset, val_subset
from cmbfe.datadir import DataDir
from cmbfe.fe_gap import FE_GAP_FIELDS, fe_gap, fe_gap_batch
from cmbfe.models import build_model, split_losses
from cmbfe.runtime import apply_thread_env, resolve_device
from cmbfe.utils import CSVLogger, atomic_write_json, seed_everything
from cmbfe.validation import VAL_FIELDS, csv_header, split_metrics, val_row, validate_split

LOG_FIELDS = ["iteration", "loss", "bbox_loss", "cls_loss", "lr", "images_per_s", "seconds"]


# ------------------------------------------------------------------------------------------- helpers
def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (1 process: ``(0, 1, 0)``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def train_step(model: nn.Module, images: list[Tensor], targets: list[dict], optimizer: Optimizer,
                scaler: torch.amp.GradScaler, amp: bool, device: torch.device, grad_clip: float = 0.0
                ) -> tuple[Tensor, ...]:
    """One optimisation step (AMP autocast when ``amp``, gradient clipping when ``grad_clip`` > 0); returns
    the detached (total, bbox, cls) losses."""
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


def step_time(model: nn.Module, images: list[Tensor], targets: list[dict], optimizer: Optimizer,
              repeats: int = 5, *, warmup: int = 1, amp: bool = False) -> dict[str, Any]:
    """Seconds per training step (forward + backward + optimizer) on one fixed batch (paper Table 3).

    Runs ``warmup`` untimed then ``repeats`` timed steps on the device of ``images`` (synchronising CUDA);
    returns ``{"median_s", "times_s", "batch", "images_per_s"}``. The steps update the model's weights.
    """
    device = images[0].device
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        train_step(model, images, targets, optimizer, scaler, scaler.is_enabled(), device)
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        train_step(model, images, targets, optimizer, scaler, scaler.is_enabled(), device)
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
    ``round(f * iterations)`` for ``f`` in ``lr_steps``; anything else a ``LambdaLR`` over
    :func:`lr_factor`."""
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
    fixed: list[tuple[Tensor, dict]] | None = None  # fixed training batch of the FE gap (FE runs only)
    val_sub: SliceDataset | None = None  # the in-loop validation set (``val_ds`` or its fixed subset)
    start: int = 0  # first iteration of this call
    elapsed: float = 0.0  # training seconds of earlier calls

    def final_model(self) -> nn.Module:
        """What is validated and saved: the EMA weights when ``train.ema`` is on, else the detector."""
        return self.core if self.ema is None else self.ema.module

    def state(self) -> TrainState:
        """What the checkpoint saves and restores (with the RNG states)."""
        return TrainState(self.core, self.optimizer, self.scheduler, self.scaler, self.ema)


def build_parts(cfg: C.Config, out: Path, pre: Path, s: Session, *, resume: bool) -> Parts:
    """Seed, then build the data sets, the detector, optimizer, LR schedule, AMP scaler and EMA; restore them
    from ``out/checkpoint.pt`` when resuming; write ``out/config.yaml``; wrap in DDP; start the data stream at
    the first iteration of this call."""
    tc = cfg.train
    seed_everything(tc.seed + s.rank)
    ds = training_dataset(cfg, pre)
    val_ds = None
    if s.main and DataDir(pre).has_split("val"):
        val_ds = SliceDataset(pre, "val", input=cfg.model.input, cache=tc.cache)
    elif s.main:
        warnings.warn(f"{DataDir(pre).split_path('val')}: not found: no validation", stacklevel=3)
    core = build_model(cfg.model, cfg.fe).to(s.device)
    if tc.channels_last if s.device.type == "cuda" else tc.channels_last_cpu:
        core = core.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(core, tc)
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp)
    ckpt = Checkpointer(out / "checkpoint.pt", cfg, device=s.device, rank=s.rank, world=s.world)
    ema = build_ema(core, tc.ema)
    p = Parts(cfg, out, s, core, core, optimizer, scheduler, scaler, ema, val_ds, iter(()), ckpt)
    p.val_sub = val_subset(val_ds, tc.val_subset) if val_ds is not None else None
    if resume and p.checkpointer.path.is_file():
        p.start, p.elapsed = p.checkpointer.restore(p.state())
    elif resume and s.main:
        warnings.warn(f"{p.checkpointer.path} not found: starting from iteration 0", stacklevel=3)
    if s.main:
        out.mkdir(parents=True, exist_ok=True)
        C.dump(cfg, out / "config.yaml")
    if s.world > 1:
        ids = [s.local] if s.device.type == "cuda" else None
        p.model = nn.parallel.DistributedDataParallel(core, device_ids=ids)
    sampler = InfiniteSampler(len(ds), tc.batch_size // s.world, seed=tc.seed, rank=s.rank,
                              world_size=s.world, start_batch=p.start)
    gen = torch.Generator().manual_seed(tc.seed)  # keeps DataLoader off the global RNG
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn, generator=gen,
                        num_workers=tc.workers, persistent_workers=tc.workers > 0,
                        pin_memory=s.device.type == "cuda")
    p.batches = iter(loader)
    if cfg.fe.enabled and s.main and tc.val_every >= 0:
        p.fixed = fe_gap_batch(ds)
    return p


class RunLogs:
    """``RUN/log.csv``, ``RUN/val.csv`` (unless ``val_every`` is -1) and TensorBoard (``train.tensorboard``),
    on the main process only; appended to on resume. A context manager that closes them."""

    def __init__(self, out: Path, tc: C.TrainConfig, main: bool, append: bool, fe: bool = False,
                 start: int = 0) -> None:
        self.log = self.val = self.tb = self.fe_gap = None
        if not main:
            return
        # a resumed run restarts at its checkpoint ``start``: rows logged after it before the kill are dropped
        self.log = CSVLogger(out / "log.csv", LOG_FIELDS, append=append, keep_through=start)
        if tc.val_every >= 0:  # -1: never validated, so no val.csv
            fields = csv_header(out / "val.csv", VAL_FIELDS, append)  # a resumed old run keeps its columns
            self.val = CSVLogger(out / "val.csv", fields, append=append, keep_through=start)
            if fe:  # FE runs: losses on a fixed batch with FE on / off at every validation
                self.fe_gap = CSVLogger(out / "fe_gap.csv", FE_GAP_FIELDS, append=append, keep_through=start)
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
    """Validate :meth:`Parts.final_model` into ``val.csv`` (main process; others wait): in the loop on
    ``p.val_sub``; at the last iteration on the whole split, with the subset's row (scored from the same
    detections) written first when there is a subset."""
    if p.val_ds is not None and p.val_sub is not None:
        final = it == p.cfg.train.iterations
        ds = p.val_ds if final else p.val_sub
        tv = time.perf_counter()
        m = validate_split(p.final_model(), ds, p.cfg, p.session.device)
        seconds = time.perf_counter() - tv
        if final and p.val_sub is not p.val_ds:
            ts = time.perf_counter()
            sub = split_metrics(m["detections"], p.val_sub, p.cfg)
            logs.val.log(val_row(sub, it, time.perf_counter() - ts, p.val_sub, True))
        logs.val.log(val_row(m, it, seconds, ds, ds is not p.val_ds))
        if final:  # the final model's val detections, cached as the study caches them
            atomic_write_json(p.out / f"dets_{p.val_ds.split}.json", m["detections"], indent=None)
        if logs.tb is not None:
            logs.tb.add_scalar("val/ap_voc", m["ap_voc"], it)
        if logs.fe_gap is not None and p.fixed:
            logs.fe_gap.log({"iteration": it, **fe_gap(p.core, p.fixed, p.session.device)})
    if p.session.world > 1:
        dist.barrier()


def _log_window(p: Parts, logs: RunLogs, acc: Tensor, n: int, done: int, seconds: float,
                window_s: float) -> dict:
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
        p.core.fe.set_progress(it / tc.iterations)
        ts = time.perf_counter()
        images, targets = next(p.batches)
        images = [im.to(s.device, non_blocking=True) for im in images]
        targets = targets_to(targets, s.device)
        total, bbox, cls = train_step(p.model, images, targets, p.optimizer, p.scaler, s.amp, s.device,
                                       tc.grad_clip)
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
            p.checkpointer.save(p.state(), done, clock.seconds())
        if tc.val_every > 0 and done % tc.val_every == 0 and done < tc.iterations:
            run_validation(p, logs, done)
    bar.close()
    return step_times


def save_final(p: Parts, seconds: float, step_times: list[float], end: int) -> Path:
    """``RUN/model.pt`` (:meth:`Parts.final_model`'s weights) and ``RUN/model.json`` (architecture,
    timings)."""
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
    :data:`cmbfe.checkpoint.RESUME_FREE`). ``stop_after`` ends the call after that many iterations in total
    (an interruption: a checkpoint is written, no final weights) and returns the checkpoint path. Returns
    ``out_dir/model.pt``. The parts: :func:`training_session` (DDP, threads, determinism),
    :func:`build_parts` (data, model, optimizer, resume state), :func:`train_loop`, :func:`save_final`.
    """
    out, tc = Path(out_dir), cfg.train
    pre = Path(data) if data is not None else cfg.pre_path()
    with training_session(tc) as s:
        p = build_parts(cfg, out, pre, s, resume=resume)
        with RunLogs(out, tc, s.main, append=p.start > 0, fe=cfg.fe.enabled, start=p.start) as logs:
            clock = Clock(p.elapsed)
            end = tc.iterations if stop_after is None else min(tc.iterations, stop_after)
            step_times = train_loop(p, logs, clock, end, progress)
            if end > p.start or p.start == 0:
                p.checkpointer.save(p.state(), end, clock.seconds())
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
