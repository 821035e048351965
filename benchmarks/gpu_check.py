"""GPU readiness check (issue #13): one prepared script that measures the ``paper`` path on a GPU in <= 8 min.

Sections (each one's failure is recorded in the JSON and the others still run; a global time budget,
``--budget-s``, with a cap per section):

``train_steps``  full-width VGG-16 SSD-512 and SSD-300 training steps (forward + backward + Adam) with AMP
                 and channels_last at batch 8 and 32: images/s and model-FLOPs utilisation. ``float16`` is
                 the path ``cmbfe train`` runs (``cmbfe.train.step_time``: float16 autocast + GradScaler);
                 ``bfloat16`` (autocast, no scaler) is measured beside it. FLOPs of one forward + backward
                 are counted by ``torch.utils.flop_counter.FlopCounterMode``; the peak comes from the
                 device name (``PEAK_TFLOPS``, dense fp16/bf16 tensor-core FLOP/s) or ``--peak-tflops``;
                 an unknown device gets MFU null and a note.
``fe_ratio``     Table 3's GPU column: seconds per training step of a batch of 8, SSD vs SSD-FE (same
                 weights, steps interleaved in alternating order), per ``study.timing_backbones`` of the
                 ``paper`` profile, with the paper's ratio beside it.
``predict``      ``cmbfe.predict.predict`` end to end (PNG decoding included) over synthetic 512^2 slices:
                 slices/s, and the network alone (float32 as ``predict`` runs it, and under AMP).
``ddp``          ``python -m torch.distributed.run --standalone --nproc_per_node=N -m cmbfe.cli train
                 --params paper`` for a few iterations on a synthetic PRE folder (NCCL on CUDA, gloo on CPU):
                 return code, stderr tail, the run's log.csv and timings (seconds per iteration of the real
                 ``paper`` configuration, which give the profile's cost estimate); then an in-process DDP probe
                 (``init_process_group`` over NCCL/gloo, the paper model wrapped in DDP, ``cmbfe.train``'s AMP
                 training step), because ``cmbfe train`` with one process does not initialise DDP.

Writes ``OUT/check.json`` (after every section, so a cut-off run keeps what it measured) and ``OUT/check.md``.

    .venv/bin/python benchmarks/gpu_check.py --out results/gpu        # on a GPU (make gpu-check), <= 8 min
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gc  # CPU, tiny sizes, seconds (tested)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fe_overhead import synthetic_batch  # this folder

from cmbfe import config as C
from cmbfe.models import build_model
from cmbfe.study import paper
from cmbfe.train import build_optimizer, step_time, train_step
from cmbfe.utils import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("train_steps", "fe_ratio", "predict", "ddp")
# dense fp16/bf16 tensor-core peak (TFLOP/s, fp32 accumulate, no sparsity) by device name; first match wins
PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"GH200", 989.0),
    (r"H200", 989.0),
    (r"H100.*PCIE", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100|H800", 989.0),
    (r"B200", 2250.0),
    (r"B100", 1750.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"V100", 125.0),
    (r"\bT4\b", 65.0),
    (r"RTX 4090", 165.0),
    (r"RTX A6000", 155.0),
    (r"MI300X", 1307.0),
]
# what each section may spend (s) in a full run; the dry run shares the caps but needs a fraction of them
CAPS_S = {"train_steps": 150.0, "fe_ratio": 90.0, "predict": 60.0, "ddp": 170.0}


def peak_tflops(device_name: str | None) -> float | None:
    """Dense fp16/bf16 peak TFLOP/s for a device name (``PEAK_TFLOPS``); None when unknown."""
    if not device_name:
        return None
    for pattern, value in PEAK_TFLOPS:
        if re.search(pattern, device_name.upper()):
            return value
    return None


def mfu(flops_per_step: float | None, step_s: float | None, peak: float | None) -> float | None:
    """Model-FLOPs utilisation: FLOPs per step / seconds per step / peak FLOP/s (None if anything is unknown)."""
    if not flops_per_step or not step_s or not peak:
        return None
    return flops_per_step / step_s / (peak * 1e12)


# ------------------------------------------------------------------------------------------ settings
def settings(dry: bool) -> dict[str, Any]:
    """Sizes of every section: the real ones on a GPU, tiny ones for the CPU dry run (same code paths)."""
    if dry:
        return {
            "width": 0.125, "train_models": [("ssd512", 160), ("ssd300", 128)], "train_batches": [2, 4],
            "repeats": 2, "warmup": 1, "fe_specs": ["vgg16:128", "mobilenet_v3:128", "resnet34:128"],
            "fe_batch": 2, "fe_repeats": 2, "pre_size": 128, "pre_train": 8, "pre_test": 8,
            "predict_batch": 4, "ddp_iterations": 3, "ddp_batch": 2, "ddp_workers": 1, "ddp_nproc": 2,
            "probe_size": 128, "probe_batch": 2, "probe_steps": 2,
        }  # fmt: skip
    pc = C.load("paper")
    n_gpu = torch.cuda.device_count()
    nproc = max(n for n in (1, 2, 4) if n <= max(1, n_gpu) and pc.train.batch_size % n == 0)
    return {
        "width": 1.0, "train_models": [("ssd512", 512), ("ssd300", 300)], "train_batches": [8, 32],
        "repeats": 10, "warmup": 3, "fe_specs": list(pc.study.timing_backbones),
        "fe_batch": pc.study.timing_batch, "fe_repeats": pc.study.timing_repeats, "pre_size": 512,
        "pre_train": 32, "pre_test": 64, "predict_batch": 16, "ddp_iterations": 60,
        "ddp_batch": pc.train.batch_size, "ddp_workers": pc.train.workers, "ddp_nproc": nproc,
        "probe_size": 512, "probe_batch": 8, "probe_steps": 5,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ helpers
class Budget:
    """Global deadline plus a cap per section."""

    def __init__(self, total_s: float) -> None:
        self.t0 = time.perf_counter()
        self.total_s = total_s
        self.section_end = self.t0 + total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def start_section(self, cap_s: float) -> None:
        self.section_end = min(time.perf_counter() + cap_s, self.t0 + self.total_s)

    def left(self) -> float:
        """Seconds left in the current section."""
        return self.section_end - time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def _cmd(args: list[str], timeout: float = 10.0) -> str | None:
    try:
        out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device: torch.device) -> dict[str, Any]:
    """Device, driver, CUDA/cuDNN/NCCL, torch and torchvision versions, CPU, git commit."""
    import torchvision

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "type": device.type, "name": f"CPU {cpu}", "torch": torch.__version__,
        "torchvision": torchvision.__version__, "python": platform.python_version(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "git_commit": _cmd(["git", "rev-parse", "--short", "HEAD"]), "cuda_runtime": torch.version.cuda,
    }  # fmt: skip
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {"name": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
                 "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
                 "device_count": torch.cuda.device_count(), "cudnn": torch.backends.cudnn.version(),
                 "bf16_supported": torch.cuda.is_bf16_supported()}  # fmt: skip
        with contextlib.suppress(Exception):
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        smi = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = smi.splitlines()[0] if smi else None
    return info


@contextlib.contextmanager
def recorded_warnings(sink: list[str]) -> Iterator[None]:
    """Collect the distinct warnings raised inside (e.g. cuDNN nondeterminism, AMP) into ``sink``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                msg = f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]} ({Path(w.filename).name}:{w.lineno})"
                if msg not in sink and len(sink) < 30:
                    sink.append(msg)


def _paper_model(backbone: str, size: int, width: float, fe: bool = False, placement: str | None = None):
    """The ``paper`` profile's model with ``backbone``/``size``/``width`` (and FE on/off) changed; + that config.
    Random weights (``pretrained`` off: timings do not depend on them, and the GPU machine may be offline)."""
    pc = C.load("paper")
    mc = dataclasses.replace(pc.model, backbone=backbone, size=size, width=width, pretrained=False)
    fc = dataclasses.replace(pc.fe, enabled=fe, placement=placement or pc.fe.placement)
    return build_model(mc, fc), pc


def _batch(n: int, size: int, device: torch.device, seed: int = 0):
    images, targets = synthetic_batch(n, size, 3, seed=seed)
    return [im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def count_flops(model: torch.nn.Module, images, targets, dtype: torch.dtype | None, device: torch.device) -> float:
    """FLOPs of one training forward + backward (``FlopCounterMode``); gradients are dropped afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = model(images, targets)
            total = sum(losses.values())
        total.backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def bf16_step_time(model, images, targets, optimizer, repeats: int, warmup: int, device) -> dict[str, Any]:
    """``step_time`` with bfloat16 autocast and no GradScaler (the alternative AMP dtype)."""
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            losses = model(images, targets)
            total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"median_s": med, "times_s": times, "batch": len(images), "images_per_s": len(images) / med}


def _timed_step(model, images, targets, optimizer, scaler, amp: bool, device: torch.device) -> float:
    """Seconds of one ``cmbfe.train`` training step (synchronised on CUDA)."""
    _sync(device)
    t0 = time.perf_counter()
    train_step(model, images, targets, optimizer, scaler, amp, device)
    _sync(device)
    return time.perf_counter() - t0


def make_pre(root: Path, size: int, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A synthetic PRE folder (docs/design.md layout): ``size``^2 8-bit slices, dark blobs as CMBs, COCO files.

    Two thirds of the slices hold 1-3 blobs of 3-9 px radius (at 512), the rest none; splits train/val/test.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    pre = root / "pre"
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    head = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    img_id = ann_id = 0
    for split, n in (("train", n_train), ("val", 2), ("test", n_test)):
        coco: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cmb"}]}
        pid = f"SYN-{split}"
        (pre / "images" / pid).mkdir(parents=True, exist_ok=True)
        for z in range(n):
            img_id += 1
            a = np.where(head, 160.0, 8.0) + rng.normal(0, 5, (size, size))
            blobs = []
            if z % 3 != 2:
                for _ in range(int(rng.integers(1, 4))):
                    r = float(rng.uniform(3, 9)) * size / 512 + 1.0
                    cx, cy = (float(v) for v in rng.uniform(0.3 * size, 0.7 * size, 2))
                    a[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 30.0
                    blobs.append((cx, cy, r))
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(pre / "images" / pid / f"z{z:04d}.png")
            coco["images"].append({
                "id": img_id, "file_name": f"{pid}/z{z:04d}.png", "width": size, "height": size,
                "patient_id": pid, "slice_index": z, "n_slices": n, "pixel_spacing_mm": [240 / size] * 2,
                "slice_mm": 2.0, "has_cmb": bool(blobs), "mimic_kinds": [],
            })  # fmt: skip
            for cx, cy, r in blobs:
                ann_id += 1
                coco["annotations"].append({
                    "id": ann_id, "image_id": img_id, "category_id": 1, "bbox": [cx - r, cy - r, 2 * r, 2 * r],
                    "area": 4 * r * r, "iscrowd": 0, "lesion_id": ann_id,
                })  # fmt: skip
        (pre / "annotations").mkdir(parents=True, exist_ok=True)
        (pre / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    return pre


# ------------------------------------------------------------------------------------------ sections
def section_train_steps(ctx: dict[str, Any]) -> dict[str, Any]:
    """Training steps of full-width VGG-16 SSD-512/300, AMP float16 (cmbfe.train) and bfloat16, channels_last."""
    s, device, budget, peak = ctx["settings"], ctx["device"], ctx["budget"], ctx["peak_tflops"]
    cuda = device.type == "cuda"
    rows = []
    for label, size in s["train_models"]:
        for batch in s["train_batches"]:
            for dtype_name in ("float16", "bfloat16"):
                row: dict[str, Any] = {"model": f"vgg16 {label}", "size": size, "width": s["width"], "batch": batch,
                                       "amp_dtype": dtype_name, "channels_last": True}  # fmt: skip
                if budget.left() < 5:
                    rows.append(row | {"error": "skipped: section time cap reached"})
                    continue
                try:
                    torch.manual_seed(0)
                    model, pc = _paper_model("vgg16", size, s["width"])
                    model = model.to(device).to(memory_format=torch.channels_last)
                    opt = build_optimizer(model, pc.train)[0]
                    images, targets = _batch(batch, size, device)
                    if dtype_name == "float16":
                        # cmbfe.train's path: float16 autocast + GradScaler on CUDA (float32 on CPU: AMP is CUDA-only)
                        row["amp_dtype"] = "float16" if cuda else "float32 (AMP is CUDA-only in cmbfe.train)"
                        t = step_time(model, images, targets, opt, s["repeats"], warmup=s["warmup"], amp=True)
                        flop_dtype = torch.float16 if cuda else None
                    else:
                        t = bf16_step_time(model, images, targets, opt, s["repeats"], s["warmup"], device)
                        flop_dtype = torch.bfloat16
                    flops = count_flops(model, images, targets, flop_dtype, device)
                    row |= {"median_s": _r(t["median_s"], 5), "images_per_s": _r(t["images_per_s"], 2),
                            "flops_per_step": flops, "gflops_per_image": _r(flops / batch / 1e9, 2),
                            "tflops_per_s": _r(flops / t["median_s"] / 1e12, 3),
                            "mfu": _r(mfu(flops, t["median_s"], peak), 4)}  # fmt: skip
                    if cuda:
                        row["max_memory_gib"] = _r(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                        torch.cuda.reset_peak_memory_stats(device)
                except Exception as e:  # noqa: BLE001 - one configuration (e.g. OOM at batch 32) must not stop the others
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
                finally:
                    model = opt = images = targets = None
                    _free(device)
                rows.append(row)
                m = "n/a" if row.get("mfu") is None else f"{100 * row['mfu']:.1f} %"
                print(f"  train {row['model']} {size}px b{batch} {row['amp_dtype']}: "
                      + (f"{row['median_s']:.4f} s/step, {row['images_per_s']:.1f} img/s, "
                         f"{row['gflops_per_image']:.1f} GFLOP/img, {row['tflops_per_s']:.2f} TFLOP/s, MFU {m}"
                         if "error" not in row else row["error"]), flush=True)  # fmt: skip
    errors = [r for r in rows if "error" in r]
    return {"rows": rows, "all_ok": not errors}


def section_fe_ratio(ctx: dict[str, Any]) -> dict[str, Any]:
    """Table 3's GPU column: SSD vs SSD-FE step time, batch 8, interleaved, same weights (as experiments.table3)."""
    s, device, budget = ctx["settings"], ctx["device"], ctx["budget"]
    amp = device.type == "cuda"
    rows = []
    for spec in s["fe_specs"]:
        backbone, size = spec.split(":")
        size = int(size)
        row: dict[str, Any] = {"backbone": backbone, "size": size, "width": s["width"], "batch": s["fe_batch"],
                               "repeats": s["fe_repeats"], "amp": amp, "channels_last": True}  # fmt: skip
        if budget.left() < 5:
            rows.append(row | {"error": "skipped: section time cap reached"})
            continue
        try:
            torch.manual_seed(0)
            models, opts = {}, {}
            for fe in (False, True):
                m, pc = _paper_model(backbone, size, s["width"], fe=fe)
                if fe:
                    m.load_state_dict(models[False].state_dict())
                models[fe] = m.to(device).to(memory_format=torch.channels_last)
                opts[fe] = build_optimizer(models[fe], pc.train)[0]
            images, targets = _batch(s["fe_batch"], size, device)
            # cmbfe.train's step (float16 autocast + GradScaler on CUDA), one persistent scaler per model:
            # step_time(repeats=1) would start every timed step from a fresh scaler (scale 2**16, often a skipped step)
            scalers = {fe: torch.amp.GradScaler(device.type, enabled=amp) for fe in (False, True)}
            times: dict[bool, list[float]] = {False: [], True: []}
            args = {fe: (models[fe], images, targets, opts[fe], scalers[fe], amp, device) for fe in (False, True)}
            for fe in (False, True):
                models[fe].train()
                for _ in range(s["warmup"]):
                    _timed_step(*args[fe])
            for rep in range(s["fe_repeats"]):
                for fe in (False, True) if rep % 2 == 0 else (True, False):
                    times[fe].append(_timed_step(*args[fe]))
                if budget.left() < 0:
                    row["note"] = f"cut at {rep + 1} repeats (section time cap)"
                    break
            t0, t1 = statistics.median(times[False]), statistics.median(times[True])
            row |= {"ssd_s": _r(t0, 5), "ssd_fe_s": _r(t1, 5), "ratio": _r(t1 / t0, 4)}
            key = {"vgg16": "vgg16:512", "mobilenet_v3": "mobilenet:320", "resnet34": "resnet34:300"}.get(backbone)
            if key in paper.TABLE3:
                p = paper.TABLE3[key]["s_per_batch"]
                row |= {"paper_model": key, "paper_ssd_s": p[0], "paper_ssd_fe_s": p[1], "paper_ratio": _r(p[1] / p[0], 3)}
        except Exception as e:  # noqa: BLE001 - recorded, the other configurations still run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
        finally:
            models = opts = images = targets = args = scalers = None
            _free(device)
        rows.append(row)
        print(f"  FE ratio {backbone}:{size} b{s['fe_batch']}: "
              + (f"SSD {row['ssd_s']:.4f} s, SSD-FE {row['ssd_fe_s']:.4f} s, ratio {row['ratio']:.3f}"
                 f" (paper {row.get('paper_ratio')})" if "error" not in row else row["error"]), flush=True)  # fmt: skip
    return {"rows": rows, "all_ok": not any("error" in r for r in rows)}


def section_predict(ctx: dict[str, Any]) -> dict[str, Any]:
    """``cmbfe.predict.predict`` slices/s at ``pre_size``^2, and the network alone (float32 and AMP)."""
    from cmbfe.data import SliceDataset
    from cmbfe.predict import predict

    s, device = ctx["settings"], ctx["device"]
    pre = ctx["pre"]()
    size, bs = s["pre_size"], s["predict_batch"]
    torch.manual_seed(0)
    model, _ = _paper_model("vgg16", size, s["width"])
    model = model.to(device).eval()
    ds = SliceDataset(pre, "test", negatives_ratio=None)
    out: dict[str, Any] = {"size": size, "width": s["width"], "batch": bs, "slices": len(ds), "amp": False,
                           "channels_last": False, "pin_memory": False, "workers": 0}  # fmt: skip
    predict(model, pre, "test", batch_size=bs, device=device, dataset=ds)  # warm-up (cuDNN autotuning, cache)
    _sync(device)
    t0 = time.perf_counter()
    dets = predict(model, pre, "test", batch_size=bs, device=device, dataset=ds)
    _sync(device)
    dt = time.perf_counter() - t0
    out |= {"predict_s": _r(dt, 4), "predict_slices_per_s": _r(len(ds) / dt, 2), "detections": len(dets)}
    print(f"  predict {len(ds)} slices {size}px b{bs}: {len(ds) / dt:.1f} slices/s end to end", flush=True)
    images, _ = _batch(bs, size, device)
    for name, dtype in (("float32", None), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        if dtype is not None and device.type != "cuda" and dtype == torch.float16:
            continue
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                model(images)
                times = []
                for _ in range(max(2, s["repeats"] // 2)):
                    _sync(device)
                    ts = time.perf_counter()
                    model(images)
                    _sync(device)
                    times.append(time.perf_counter() - ts)
            med = statistics.median(times)
            out[f"model_only_slices_per_s_{name}"] = _r(bs / med, 2)
            print(f"  network alone {name}: {bs / med:.1f} slices/s", flush=True)
        except Exception as e:  # noqa: BLE001 - recorded, the other configurations still run
            out[f"model_only_error_{name}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    model = None
    _free(device)
    return out


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:] if text else ""


def section_ddp(ctx: dict[str, Any]) -> dict[str, Any]:
    """torchrun start of ``cmbfe train --params paper`` (a few iterations), then an in-process DDP probe."""
    s, device, budget, dry = ctx["settings"], ctx["device"], ctx["budget"], ctx["dry_run"]
    pre = ctx["pre"]()
    run = Path(ctx["tmp"]) / "ddp_run"
    its = s["ddp_iterations"]
    sets = [f"train.iterations={its}", f"train.batch_size={s['ddp_batch']}", f"train.workers={s['ddp_workers']}",
            "train.val_every=-1", f"train.checkpoint_every={its}", f"train.log_every={max(1, its // 6)}",
            f"model.size={s['pre_size']}", f"model.width={s['width']}", "model.pretrained=false"]  # fmt: skip
    nproc = ctx["ddp_nproc"] or s["ddp_nproc"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cmbfe.cli", "train", "--params", "paper", "--data", str(pre), "--out", str(run), "--no-progress"]
    for kv in sets:
        cmd += ["--set", kv]
    env = dict(os.environ)
    if dry:
        env.setdefault("CMBFE_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "default"
    launch: dict[str, Any] = {"command": " ".join(cmd[1:]).replace(str(pre), "PRE").replace(str(run), "RUN"),
                              "nproc_per_node": nproc, "backend": "nccl" if device.type == "cuda" else "gloo",
                              "iterations": its}  # fmt: skip
    timeout = max(10.0, budget.left() - (45.0 if not dry else 15.0))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        launch |= {"returncode": p.returncode, "stdout_tail": _tail(p.stdout, 1500), "stderr_tail": _tail(p.stderr)}
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        launch |= {"returncode": None, "error": f"timed out after {timeout:.0f} s", "stderr_tail": _tail(err)}
    launch["wall_s"] = _r(time.perf_counter() - t0, 2)
    mj = run / "model.json"
    if mj.is_file():
        tm = json.loads(mj.read_text())["timings"]
        launch["timings"] = tm
        launch["ddp_in_fit"] = tm.get("world_size", 1) > 1
    if (run / "log.csv").is_file():
        with open(run / "log.csv") as f:
            launch["log"] = list(csv.DictReader(f))
    launch["ok"] = launch.get("returncode") == 0 and mj.is_file()
    print(f"  torchrun x{nproc} cmbfe train --params paper ({launch['backend']}): rc {launch.get('returncode')}, "
          f"{launch['wall_s']} s" + (f", {tm['step_s_median']:.4f} s/iteration median, world size "
                                    f"{tm['world_size']}, AMP {tm['amp']}" if mj.is_file() else ""), flush=True)  # fmt: skip
    if not launch["ok"]:
        print("  stderr tail:\n" + _tail(launch.get("stderr_tail", ""), 1500), flush=True)
    probe = ddp_probe(ctx)
    return {"launch": launch, "probe": probe, "all_ok": bool(launch["ok"] and probe.get("ok"))}


def ddp_probe(ctx: dict[str, Any]) -> dict[str, Any]:
    """One-process DDP in this process: NCCL (CUDA) / gloo (CPU), paper model, ``cmbfe.train``'s AMP step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    s, device = ctx["settings"], ctx["device"]
    cuda = device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    out: dict[str, Any] = {"backend": backend, "size": s["probe_size"], "batch": s["probe_batch"], "amp": cuda}
    if dist.is_initialized():
        return out | {"ok": False, "error": "a process group is already initialised"}
    t0 = time.perf_counter()
    try:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        torch.manual_seed(0)
        core, pc = _paper_model("vgg16", s["probe_size"], s["width"])
        core = core.to(device).to(memory_format=torch.channels_last)
        model = DDP(core, device_ids=[device.index or 0] if cuda else None)
        opt = build_optimizer(core, pc.train)[0]
        scaler = torch.amp.GradScaler(device.type, enabled=cuda)
        images, targets = _batch(s["probe_batch"], s["probe_size"], device)
        times, losses = [], []
        for _ in range(s["probe_steps"]):
            _sync(device)
            ts = time.perf_counter()
            total, _, _ = train_step(model, images, targets, opt, scaler, cuda, device, getattr(pc.train, "grad_clip", 0.0))
            _sync(device)
            times.append(time.perf_counter() - ts)
            losses.append(float(total))
        x = torch.ones(1, device=device)
        dist.all_reduce(x)
        out |= {"ok": bool(x.item() == 1.0 and all(map(math.isfinite, losses))), "losses": [_r(v, 4) for v in losses],
                "step_s": [_r(v, 4) for v in times], "scaler_scale": float(scaler.get_scale()) if cuda else None}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - recorded in the report
        out |= {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}",
                "traceback": _tail(traceback.format_exc(), 2000)}  # fmt: skip
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _free(device)
    out["wall_s"] = _r(time.perf_counter() - t0, 2)
    print(f"  DDP probe ({backend}, 1 process, in process): "
          + ("ok, steps " + ", ".join(f"{v:.3f}" for v in out["step_s"]) + " s" if out["ok"] else out.get("error", "failed")),
          flush=True)  # fmt: skip
    return out


SECTION_FUNCS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train_steps": section_train_steps,
    "fe_ratio": section_fe_ratio,
    "predict": section_predict,
    "ddp": section_ddp,
}


# ------------------------------------------------------------------------------------------ summary
def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Goals of issue #13 and the ``paper`` profile's cost estimate from the measured seconds per iteration."""
    dry = report["dry_run"]

    def res(name: str) -> dict[str, Any]:
        return (report["sections"].get(name) or {}).get("results") or {}

    goals: dict[str, Any] = {}
    rows = res("train_steps").get("rows") or []
    ssd512 = [r for r in rows if r["model"].endswith("ssd512") and r.get("mfu") is not None]
    best = max(ssd512, key=lambda r: r["mfu"], default=None)
    goals["ssd512_vgg16_amp_mfu"] = {
        "target": ">= 0.35", "value": best["mfu"] if best else None,
        "at": f"batch {best['batch']}, {best['amp_dtype']}" if best else None,
        "met": None if best is None or dry else best["mfu"] >= 0.35,
    }  # fmt: skip
    fe_rows = res("fe_ratio").get("rows") or []
    vgg = next((r for r in fe_rows if r["backbone"] == "vgg16" and r.get("ratio") is not None), None)
    goals["fe_ratio_vgg16"] = {"target": "<= 1.03", "value": vgg["ratio"] if vgg else None,
                               "met": None if vgg is None or dry else vgg["ratio"] <= 1.03}  # fmt: skip
    goals["wall_s"] = {"target": "<= 480", "value": report.get("wall_s"),
                       "met": None if report.get("wall_s") is None else report["wall_s"] <= 480}  # fmt: skip
    if dry:
        for g in goals.values():
            g["note"] = "dry run (CPU, tiny sizes): figures exercise the code, not the goal"
    est: dict[str, Any] = {}
    launch = res("ddp").get("launch") or {}
    tm = launch.get("timings") or {}
    s512 = tm.get("step_s_median")
    if s512:
        pc = C.load("paper")
        its = pc.train.iterations
        f16 = {(r["size"], r["batch"]): r["median_s"] for r in rows
               if r.get("median_s") and r["amp_dtype"] in ("float16", "float32 (AMP is CUDA-only in cmbfe.train)")}  # fmt: skip
        sizes = sorted({r["size"] for r in rows})
        b = min((r["batch"] for r in rows), default=None)
        ratio_300 = None
        if len(sizes) == 2 and (sizes[0], b) in f16 and (sizes[1], b) in f16:
            ratio_300 = f16[(sizes[0], b)] / f16[(sizes[1], b)]
        h512 = s512 * its / 3600
        h300 = h512 * ratio_300 if ratio_300 else None
        n_seeds, n_sizes = len(pc.study.seeds), len(pc.study.sizes)
        main_h = n_seeds * 2 * (h512 + (h300 if h300 else h512)) if n_sizes == 2 else None
        cv_its = pc.study.cv_iterations or its
        cv_h = pc.study.folds * 2 * s512 * cv_its / 3600
        abl_h = len(pc.study.ablations) * 2 * s512 * (pc.study.ablation_iterations or its) / 3600
        est = {
            "source": f"median seconds per iteration of the torchrun 'cmbfe train --params paper' start "
                      f"({launch.get('iterations')} iterations, batch {tm.get('batch_size')}, world size "
                      f"{tm.get('world_size')}, AMP {tm.get('amp')}, {tm.get('device')}); SSD-300 scaled by the "
                      f"SSD-300/SSD-512 step-time ratio at batch {b}",
            "s_per_iteration_ssd512": _r(s512, 5), "ssd300_over_ssd512": _r(ratio_300, 3),
            "hours_per_run_ssd512": _r(h512, 2), "hours_per_run_ssd300": _r(h300, 2),
            "main_grid_hours": _r(main_h, 1), "cv_hours": _r(cv_h, 1), "ablation_hours": _r(abl_h, 1),
            "total_hours": _r((main_h or 0) + cv_h + abl_h, 1),
            "assumptions": f"{its} iterations per run; main grid {n_seeds} seeds x SSD/SSD-FE x {pc.study.sizes}; "
                           f"CV {pc.study.folds} folds x SSD/SSD-FE at SSD-512 ({cv_its} iterations); ablations "
                           f"{len(pc.study.ablations)} x 2 settings x {pc.study.ablation_iterations or its} iterations "
                           f"at SSD-512; validation, prediction and evaluation not included",
        }  # fmt: skip
        if dry:
            est["note"] = "dry run: tiny CPU model, not an estimate of anything"
    return {"goals": goals, "paper_estimate": est}


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """``check.md``: device, versions, one table per section, goals, cost estimate, errors and warnings."""
    d = report["device"]
    lines = [f"# GPU check{' (DRY RUN: CPU, tiny sizes; not a measurement of the GPU path)' if report['dry_run'] else ''}",
             "", f"`{report['command']}` — {report['started']}, {report['wall_s']} s (budget {report['budget_s']} s)", "",
             "| device | driver | CUDA | cuDNN | NCCL | torch | torchvision | peak TFLOP/s | commit |",
             "|---|---|---|---|---|---|---|---|---|",
             (f"| {d.get('name')} | {_fmt(d.get('driver'))} | {_fmt(d.get('cuda_runtime'))} | {_fmt(d.get('cudnn'))} | "
             f"{_fmt(d.get('nccl'))} | {d.get('torch')} | {d.get('torchvision')} | "
             f"{_fmt(report['peak']['tflops'], 0)} ({report['peak']['source']}) | {_fmt(d.get('git_commit'))} |"), ""]  # fmt: skip
    sec = report["sections"]
    for name in SECTIONS:
        if name not in sec:
            continue
        s = sec[name]
        status = "ok" if s["ok"] else f"**FAILED**: {s.get('error')}"
        lines += [f"## {name} ({s['seconds']} s, {status})", ""]
        res = s.get("results") or {}
        if name == "train_steps" and res.get("rows"):
            lines += ["| model | size | width | batch | AMP dtype | s/step | images/s | GFLOP/image (fwd+bwd) | TFLOP/s | MFU | max mem GiB |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for r in res["rows"]:
                if "error" in r:
                    lines.append(f"| {r['model']} | {r['size']} | {r['width']} | {r['batch']} | {r['amp_dtype']} | {r['error']} ||||||")
                    continue
                lines.append(f"| {r['model']} | {r['size']} | {r['width']} | {r['batch']} | {r['amp_dtype']} | "
                             f"{_fmt(r['median_s'], 4)} | {_fmt(r['images_per_s'], 1)} | {_fmt(r['gflops_per_image'], 1)} | "
                             f"{_fmt(r['tflops_per_s'], 2)} | {_fmt(None if r['mfu'] is None else 100 * r['mfu'], 1)}"
                             f"{'' if r['mfu'] is None else ' %'} | {_fmt(r.get('max_memory_gib'), 1)} |")  # fmt: skip
        elif name == "fe_ratio" and res.get("rows"):
            lines += ["| backbone | input | batch | s/batch SSD | s/batch SSD-FE | FE ratio | paper s/batch SSD / SSD-FE | paper ratio |",
                      "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for r in res["rows"]:
                if "error" in r:
                    lines.append(f"| {r['backbone']} | {r['size']} | {r['batch']} | {r['error']} |||||")
                    continue
                paper_s = f"{r['paper_ssd_s']:.3f} / {r['paper_ssd_fe_s']:.3f}" if "paper_ssd_s" in r else "—"
                lines.append(f"| {r['backbone']} | {r['size']}x{r['size']} | {r['batch']} | {_fmt(r['ssd_s'], 4)} | "
                             f"{_fmt(r['ssd_fe_s'], 4)} | {_fmt(r['ratio'], 3)} | {paper_s} | {_fmt(r.get('paper_ratio'), 3)} |")  # fmt: skip
        elif name == "predict" and res:
            lines += ["| input | width | batch | slices | cmbfe predict slices/s | network alone fp32 | fp16 | bf16 |",
                      "|---|---|---|---|---|---|---|---|",
                      (f"| {res['size']}x{res['size']} | {res['width']} | {res['batch']} | {res['slices']} | "
                      f"{_fmt(res.get('predict_slices_per_s'), 1)} | {_fmt(res.get('model_only_slices_per_s_float32'), 1)} | "
                      f"{_fmt(res.get('model_only_slices_per_s_float16'), 1)} | {_fmt(res.get('model_only_slices_per_s_bfloat16'), 1)} |")]  # fmt: skip
        elif name == "ddp" and res:
            la, pr = res.get("launch", {}), res.get("probe", {})
            tm = la.get("timings") or {}
            lines += [f"- `{la.get('command')}` ({la.get('backend')}): return code {la.get('returncode')}, "
                      f"{la.get('wall_s')} s; world size {tm.get('world_size')}, AMP {tm.get('amp')}, median "
                      f"{_fmt(tm.get('step_s_median'), 4)} s/iteration, {_fmt(tm.get('images_per_s'), 1)} images/s"
                      + ("" if la.get("ddp_in_fit", True) else " (one process: `fit` does not initialise DDP)"),
                      (f"- in-process DDP probe ({pr.get('backend')}, VGG-16 SSD-{pr.get('size')}, batch {pr.get('batch')}, "
                      f"AMP {pr.get('amp')}): {'ok' if pr.get('ok') else 'FAILED ' + str(pr.get('error'))}; step s "
                      f"{pr.get('step_s')}, losses {pr.get('losses')}")]  # fmt: skip
            if not la.get("ok"):
                lines += ["", "```", _tail(la.get("stderr_tail", ""), 1500), "```"]
        if s.get("warnings"):
            lines += ["", "Warnings:", *[f"- `{w}`" for w in s["warnings"]]]
        lines.append("")
    lines += ["## Goals (issue #13)", "", "| goal | target | value | met |", "|---|---|---|---|"]
    for k, g in report["goals"].items():
        v = "—" if g["value"] is None else f"{g['value']:.4g}"
        lines.append(f"| {k}{' (' + g['at'] + ')' if g.get('at') else ''} | {g['target']} | {v} | {_fmt(g['met'])} |")
    if report["goals"] and report["dry_run"]:
        lines += ["", "Dry run: the figures exercise the code paths; they say nothing about the goals."]
    est = report.get("paper_estimate") or {}
    if est:
        lines += ["", "## `paper` profile cost estimate", "",
                  (f"{est['s_per_iteration_ssd512']} s/iteration (SSD-512) ⇒ {est['hours_per_run_ssd512']} h per run; "
                  f"SSD-300 {_fmt(est['hours_per_run_ssd300'], 2)} h; main grid {_fmt(est['main_grid_hours'], 1)} h, "
                  f"CV {est['cv_hours']} h, ablations {est['ablation_hours']} h: **{est['total_hours']} GPU-hours**."),
                  "", f"Source: {est['source']}. Assumptions: {est['assumptions']}."]  # fmt: skip
        if est.get("note"):
            lines += ["", est["note"]]
    lines.append("")
    atomic_write_text(path, "\n".join(lines))


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds: the code paths only")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "gpu", help="folder for check.json / check.md")
    ap.add_argument("--budget-s", type=float, default=480.0, help="global time budget (s)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the peak (TFLOP/s) for MFU")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--ddp-nproc", type=int, default=0, help="torchrun --nproc_per_node (0: 2 in the dry run, "
                    "else the number of GPUs, at most 4 and dividing the paper batch)")  # fmt: skip
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad} (allowed: {', '.join(SECTIONS)})")
    if args.dry_run:
        device = torch.device("cpu")
    elif args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True  # as cmbfe.train.fit on CUDA
    elif not args.dry_run:
        print("gpu_check: no CUDA device; running the full sizes on CPU will not finish in the budget "
              "(use --dry-run for the code-path check)", file=sys.stderr)  # fmt: skip
    if os.environ.get("CMBFE_THREADS"):
        torch.set_num_threads(int(os.environ["CMBFE_THREADS"]))
    budget = Budget(args.budget_s)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    info = device_info(device)
    peak = args.peak_tflops if args.peak_tflops else (peak_tflops(info["name"]) if device.type == "cuda" else None)
    peak_src = "--peak-tflops" if args.peak_tflops else ("device-name table" if peak else "unknown")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    cmd = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {
        "schema": 1, "issue": 13, "dry_run": args.dry_run, "command": cmd.strip(), "started": started,
        "budget_s": args.budget_s, "device": info,
        "peak": {"tflops": peak, "source": peak_src,
                 "note": None if peak else "unknown device: MFU is null (give --peak-tflops)"},
        "settings": None, "sections": {}, "goals": {}, "paper_estimate": {}, "wall_s": None,
    }  # fmt: skip
    print(f"gpu_check{' --dry-run' if args.dry_run else ''}: {info['name']}, torch {info['torch']}, "
          f"peak {peak} TFLOP/s ({peak_src}), budget {args.budget_s:.0f} s", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cmbfe-gpu-check-") as tmp:
        s = settings(args.dry_run)
        report["settings"] = s
        pre_holder: dict[str, Path] = {}

        def get_pre() -> Path:
            if "pre" not in pre_holder:
                pre_holder["pre"] = make_pre(Path(tmp), s["pre_size"], s["pre_train"], s["pre_test"])
            return pre_holder["pre"]

        ctx = {"settings": s, "device": device, "budget": budget, "peak_tflops": peak, "dry_run": args.dry_run,
               "pre": get_pre, "tmp": tmp, "ddp_nproc": args.ddp_nproc}  # fmt: skip
        for name in wanted:
            budget.start_section(CAPS_S[name])
            entry: dict[str, Any] = {"ok": False, "error": None, "seconds": None, "results": None, "warnings": []}
            print(f"[{name}] (cap {min(CAPS_S[name], budget.left()):.0f} s)", flush=True)
            t0 = time.perf_counter()
            if budget.left() < 5:
                entry["error"] = "skipped: global time budget spent"
            else:
                try:
                    with recorded_warnings(entry["warnings"]):
                        res = SECTION_FUNCS[name](ctx)
                    entry["results"] = res
                    entry["ok"] = bool(res.pop("all_ok", True))
                    if not entry["ok"]:
                        entry["error"] = "some configurations failed (see results)"
                except Exception as e:  # noqa: BLE001 - recorded, the other configurations still run
                    entry["error"] = f"{type(e).__name__}: {e}"
                    entry["traceback"] = _tail(traceback.format_exc(), 3000)
                    print(f"  FAILED: {entry['error']}", flush=True)
            entry["seconds"] = _r(time.perf_counter() - t0, 2)
            report["sections"][name] = entry
            report["wall_s"] = _r(budget.elapsed(), 1)
            report |= summarise(report)
            atomic_write_text(out / "check.json", json.dumps(_clean(report), indent=1, allow_nan=False))
    report["wall_s"] = _r(budget.elapsed(), 1)
    report |= summarise(report)
    atomic_write_text(out / "check.json", json.dumps(_clean(report), indent=1, allow_nan=False))
    write_markdown(_clean(report), out / "check.md")
    ok = all(e["ok"] for e in report["sections"].values())
    print(f"gpu_check: {'all sections ok' if ok else 'SOME SECTIONS FAILED'} in {report['wall_s']} s -> "
          f"{out / 'check.json'}, {out / 'check.md'}", flush=True)  # fmt: skip
    for k, g in report["goals"].items():
        print(f"  goal {k}: {g['value']} (target {g['target']}, met {g['met']})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
