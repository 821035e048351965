"""Throughput per backbone and input size: images/s of a training step and of inference, as a table.

On CUDA: AMP (bfloat16 autocast) and channels_last. Training steps use FE when ``--fe`` is given.

    .venv/bin/python benchmarks/bench_throughput.py --models vgg16:300,vgg16:512,resnet34:300,mobilenet_v3:320 \\
        --width 0.25 --batch 4 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from bench_fe_overhead import synthetic_batch  # this script's folder is on sys.path when run as a script

from cmbfe.config import FEConfig, ModelConfig
from cmbfe.models import build_model


def measure(spec: str, args: argparse.Namespace, device: torch.device) -> dict[str, float | int | str]:
    """Median seconds per train step and per inference batch for ``backbone:size``."""
    backbone, size = spec.split(":")
    cfg = ModelConfig(backbone=backbone, size=int(size), width=args.width, priors=args.priors)
    model = build_model(cfg, FEConfig(enabled=args.fe)).to(device)
    amp = device.type == "cuda"
    if amp:
        model = model.to(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images, targets = synthetic_batch(args.batch, int(size), args.boxes)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    def timed(fn) -> float:
        if amp:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if amp:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def train_step() -> None:
        model.train()
        with autocast():
            losses = model(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        with autocast():
            model(images)

    for _ in range(args.warmup):
        train_step()
        infer()
    train = statistics.median(timed(train_step) for _ in range(args.repeats))
    inference = statistics.median(timed(infer) for _ in range(args.repeats))
    return {
        "model": spec,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "train_s_per_batch": round(train, 4),
        "train_img_s": round(args.batch / train, 2),
        "infer_img_s": round(args.batch / inference, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16:300,vgg16:512,resnet34:300,mobilenet_v3:320")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--boxes", type=int, default=3)
    ap.add_argument("--priors", default="paper", choices=["paper", "cmb"])
    ap.add_argument("--fe", action="store_true", help="train steps with FE enabled")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args(argv)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [measure(spec, args, device) for spec in args.models.split(",")]
    print(
        f"device {device} (AMP bf16 + channels_last: {device.type == 'cuda'}), threads {torch.get_num_threads()}, "
        f"width {args.width}, batch {args.batch}, FE {args.fe}, repeats {args.repeats}"
    )
    cols = list(rows[0])
    print(" | ".join(f"{c:>18}" for c in cols))
    for row in rows:
        print(" | ".join(f"{row[c]!s:>18}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
