"""FE training overhead: median time of a full training step (forward + backward + Adam) with FE vs without.

Same model, same batch; the two variants are interleaved (order alternating per repeat) so drift and
contention hit both alike. Prints both medians and their ratio (target <= 1.03).

    .venv/bin/python benchmarks/bench_fe_overhead.py --size 300 --width 0.5 --batch 4 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cmbfe.config import FEConfig, ModelConfig
from cmbfe.models import build_model


def synthetic_batch(
    batch: int, size: int, boxes_per_image: int, seed: int = 0
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Gray3 images in [0, 1] (``size`` px, as after preprocessing) with dark blobs and their xyxy boxes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, targets = [], []
    for _ in range(batch):
        img = 0.6 + 0.1 * torch.rand(size, size, generator=g)
        centres = 20 + torch.rand(boxes_per_image, 2, generator=g) * (size - 40)
        radii = size / 512 * (2 + 8 * torch.rand(boxes_per_image, generator=g))  # 4-20 px boxes at 512
        for (cx, cy), r in zip(centres.tolist(), radii.tolist()):
            img = img - 0.4 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2))
        boxes = torch.cat([centres - radii[:, None], centres + radii[:, None]], dim=1)
        images.append(img.clamp(0, 1).expand(3, -1, -1).contiguous())
        targets.append({"boxes": boxes, "labels": torch.ones(boxes_per_image, dtype=torch.int64)})
    return images, targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--size", type=int, default=300)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--boxes", type=int, default=3, help="CMB boxes per image")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--placement", default="post_l2norm", choices=["post_l2norm", "pre_l2norm"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args(argv)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=args.backbone, size=args.size, width=args.width, priors="paper")
    model = build_model(cfg, FEConfig(enabled=True, placement=args.placement)).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images, targets = synthetic_batch(args.batch, args.size, args.boxes)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    def step(fe: bool) -> float:
        model.fe.enabled = fe
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = model(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step(False)
        step(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.repeats):
        for fe in (False, True) if r % 2 == 0 else (True, False):
            times[fe].append(step(fe))
    base, with_fe = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"{args.backbone} size {args.size} width {args.width} batch {args.batch} boxes/img {args.boxes} "
        f"placement {args.placement} device {device} threads {torch.get_num_threads()} repeats {args.repeats}"
    )
    print(f"median step without FE: {base * 1e3:9.1f} ms   ({args.batch / base:7.2f} img/s)")
    print(f"median step with FE:    {with_fe * 1e3:9.1f} ms   ({args.batch / with_fe:7.2f} img/s)")
    ratio = with_fe / base
    print(f"ratio FE / plain: {ratio:.3f} (target <= 1.03: {'ok' if ratio <= 1.03 else 'ABOVE'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
