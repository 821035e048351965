"""Training recipes side by side: learning curves (val AP every 10 % of training) on one PRE folder.

Each recipe is a list of ``--set`` overrides on a profile; every recipe trains as its own
``cmbfe train`` process (one thread each, ``--jobs`` at a time), validating every 10 % of its
iterations, and the script prints one table: val AP (IoU 0.5, VOC all-point) per recipe and check,
the change over the last 20 % (the plateau criterion of docs/training.md) and the wall time.
This is how the recipe table of docs/training.md was measured::

    python benchmarks/recipes.py --data data/default/pre --out runs/recipes --recipes base cos128 ...
    python benchmarks/recipes.py --list

Runs are resumable (a finished run is reused, a killed one resumes). Nothing is written outside ``--out``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

# name -> --set overrides on the profile (docs/training.md says what each one tests)
RECIPES: dict[str, list[str]] = {
    # the committed default before issue #9 (step LR, 256-px windows), trained longer
    "step256": ["train.iterations=1500", "train.lr=0.003"],
    # warm-up + cosine, EMA, clipping, 256-px windows
    "cos256": ["train.iterations=1500", "train.lr=0.003", "train.schedule=cosine", "train.warmup=100",
               "train.ema=0.995", "train.grad_clip=10.0"],
    # the same on 128-px windows (2.95x images/s), 3x the iterations for the same time
    "cos128": ["train.iterations=4500", "train.lr=0.003", "train.schedule=cosine", "train.warmup=150",
               "train.ema=0.998", "train.grad_clip=10.0", "model.train_crop=128"],
    # the candidate default: 128-px windows, warm-up + cosine, no EMA (EMA lags a fast-moving model badly)
    "cos128s": ["train.iterations=1500", "train.lr=0.003", "train.schedule=cosine", "train.warmup=100",
                "train.grad_clip=10.0", "model.train_crop=128"],
    # the default profile's recipe: cosine to 1 % of the LR by 80 % of training, then flat (plateau window)
    "default": ["train.iterations=2000", "train.lr=0.003", "train.schedule=cosine", "train.warmup=100",
                "train.cosine_end=0.8", "train.lr_min=0.01", "train.grad_clip=10.0", "model.train_crop=128",
                "model.max_box_mm=20.0"],
    # the default recipe at twice the iterations: does the last 20 % flatten?
    "default4k": ["train.iterations=4000", "train.lr=0.003", "train.schedule=cosine", "train.warmup=100",
                  "train.cosine_end=0.8", "train.lr_min=0.01", "train.grad_clip=10.0", "model.train_crop=128",
                  "model.max_box_mm=20.0"],
    # issue #17: heads only on the three finest maps (priors 3.75/7.5/15 mm), the rest as "default" (2000 its)
    "heads3": ["train.iterations=2000", "train.lr=0.003", "train.schedule=cosine", "train.warmup=100",
               "train.cosine_end=0.8", "train.lr_min=0.01", "train.grad_clip=10.0", "model.train_crop=128",
               "model.max_box_mm=20.0", "model.heads=3"],
    # the default profile's recipe since issue #17: heads3 trained 3000 iterations
    "heads3_3k": ["train.iterations=3000", "train.lr=0.003", "train.schedule=cosine", "train.warmup=100",
                  "train.cosine_end=0.8", "train.lr_min=0.01", "train.grad_clip=10.0", "model.train_crop=128",
                  "model.max_box_mm=20.0", "model.heads=3"],
    "cos128b8": ["train.iterations=2250", "train.batch_size=8", "train.lr=0.004", "train.schedule=cosine",
                 "train.warmup=100", "train.ema=0.997", "train.grad_clip=10.0", "model.train_crop=128"],
}


def iterations_of(overrides: list[str]) -> int:
    """``train.iterations`` of a recipe (the last override that sets it)."""
    its = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.iterations=")]
    if not its:
        raise SystemExit("every recipe must set train.iterations")
    return its[-1]


def command(name: str, overrides: list[str], args: argparse.Namespace) -> list[str]:
    """The ``cmbfe train`` command line of recipe ``name`` (validation every 10 %)."""
    its = iterations_of(overrides)
    sets = [*overrides, f"train.val_every={max(1, its // 10)}", f"train.checkpoint_every={max(1, its // 10)}",
            f"train.seed={args.seed}"]
    cmd = [sys.executable, "-m", "cmbfe.cli", "train", "--params", args.params, "--data", str(args.data),
           "--out", str(args.out / name), "--no-progress"]
    if (args.out / name / "checkpoint.pt").is_file():
        cmd.append("--resume")
    return cmd + [a for s in sets for a in ("--set", s)]


def curve(run: Path) -> pd.Series:
    """Val AP by iteration of a finished (or running) run."""
    path = run / "val.csv"
    if not path.is_file():
        return pd.Series(dtype=float)
    val = pd.read_csv(path)
    return val.set_index("iteration")["ap_voc"]


def summary(names: list[str], out: Path) -> pd.DataFrame:
    """One row per recipe: AP at each 10 % of training, last-20 % change, wall time."""
    rows = []
    for name in names:
        c = curve(out / name)
        if c.empty:
            continue
        its = iterations_of(RECIPES[name])
        row: dict[str, object] = {"recipe": name}
        for it, ap in c.items():
            row[f"{round(100 * it / its)}%"] = round(float(ap), 3)
        tail = c[c.index >= 0.8 * its]
        row["last 20 % change"] = round(float(tail.max() - tail.min()), 3) if len(tail) > 1 else None
        log = out / name / "log.csv"
        if log.is_file():
            row["train s"] = round(float(pd.read_csv(log)["seconds"].iloc[-1]))
        rows.append(row)
    df = pd.DataFrame(rows)
    pct = sorted((c for c in df.columns if c.endswith("%") and c[:-1].isdigit()), key=lambda c: int(c[:-1]))
    rest = [c for c in df.columns if c not in pct and c != "recipe"]
    return df[["recipe", *pct, *rest]] if len(df) else df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="PRE folder")
    ap.add_argument("--out", type=Path, default=Path("runs/recipes"))
    ap.add_argument("--params", default="default")
    ap.add_argument("--recipes", nargs="*", default=None, help="names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--list", action="store_true", help="print the recipes and exit")
    ap.add_argument("--report", action="store_true", help="only print the table of what has run")
    args = ap.parse_args(argv)
    names = args.recipes or list(RECIPES)
    if args.list:
        for n in names:
            print(f"{n}: {' '.join(RECIPES[n])}")
        return 0
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    if not args.report:
        if args.data is None:
            raise SystemExit("--data PRE is required")
        args.out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CMBFE_THREADS": "1", "OMP_NUM_THREADS": "1"}
        todo = [n for n in names if not (args.out / n / "model.pt").is_file()]
        running: list[tuple[str, subprocess.Popen, float]] = []
        while todo or running:
            while todo and len(running) < args.jobs:
                n = todo.pop(0)
                log = open(args.out / f"{n}.log", "a")  # noqa: SIM115 - closed with the process
                running.append((n, subprocess.Popen(command(n, RECIPES[n], args), env=env, stdout=log,
                                                    stderr=subprocess.STDOUT), time.time()))
            time.sleep(5)
            for item in list(running):
                n, proc, t0 = item
                if proc.poll() is not None:
                    running.remove(item)
                    print(f"{n}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
    table = summary(names, args.out)
    print(table.to_string(index=False))
    table.to_csv(args.out / "recipes.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
