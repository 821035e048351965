"""Thread invariance, measured: the seed-0 configuration of a profile trained with 1 and with 2 threads.

Each thread count trains the profile's configuration (``train.seed=0`` plus any ``--set``) as its own
``cmbfe train`` process with ``CMBFE_THREADS`` (and the OpenMP/MKL/OpenBLAS pools, ``cmbfe.runtime.THREAD_VARS``)
set to that count, one run after the other so that they do not share cores. Each model is then evaluated as
Table 2 evaluates a run (``cmbfe.study.evaluate_run``: AP, VOC all-point at the profile's ``eval`` matching):
test AP on detections predicted here on one thread, val AP on the run's final validation detections
(``dets_val.json``, predicted in the training process, as the study reuses them). The script writes ``results[/<profile>]/thread_invariance.csv``
(columns ``threads``, ``test AP``, ``val AP``, ``train s`` (training seconds), ``iterations``, ``run``) and
prints the spread (max - min) of test and val AP over thread counts; issue #17 asks for a test AP spread
<= 0.03 on the default profile::

    python benchmarks/thread_invariance.py --params default            # about twice a default run's time
    python benchmarks/thread_invariance.py --params default --set model.heads=3 --threads 1 2
    python benchmarks/thread_invariance.py --dry-run --out /tmp/ti     # smoke profile, a few iterations

Resumable: runs live in ``--out/<config hash>/threads<N>`` (default ``runs/<profile>/thread_invariance``);
a finished run is reused, a killed one resumes from its checkpoint. The data are the profile's cached
cohort (``cmbfe.study.ensure_data``) unless ``--data PRE`` is given. ``--dry-run`` runs the whole pipeline
on the smoke profile with ``train.iterations=4`` and writes the CSV under ``--out``, not ``results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from cmbfe import config as C
from cmbfe.runtime import THREAD_VARS

COLUMNS = ["threads", "test AP", "val AP", "train s", "iterations", "run"]
DRY_RUN_SETS = ["train.iterations=4", "train.checkpoint_every=2", "train.log_every=1", "train.val_every=0"]


def run_dir(out: Path, cfg: C.Config, data: Path, threads: int) -> Path:
    """``out/<hash of the configuration and data folder>/threads<N>``: a changed ``--set`` trains anew."""
    blob = json.dumps({"cfg": cfg.hash(), "data": str(Path(data).resolve())}).encode()
    key = hashlib.sha256(blob).hexdigest()[:12]
    return out / key / f"threads{threads}"


def train_command(params: str, sets: list[str], data: Path, run: Path) -> list[str]:
    """The ``cmbfe train`` command line of one run (``--resume`` when a checkpoint is there)."""
    cmd = [sys.executable, "-m", "cmbfe.cli", "train", "--params", params, "--data", str(data), "--out",
           str(run), "--no-progress"]
    if (run / "checkpoint.pt").is_file():
        cmd.append("--resume")
    return cmd + [a for s in sets for a in ("--set", s)]


def train(params: str, sets: list[str], data: Path, run: Path, threads: int) -> None:
    """Train one run in a subprocess with every thread pool sized ``threads`` (unless it is finished);
    its output goes to ``run.parent/threads<N>.log``. A failed run is an error naming that log."""
    if (run / "model.pt").is_file():
        print(f"threads={threads}: reusing {run}", flush=True)
        return
    run.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{v: str(threads) for v in THREAD_VARS}}
    log = run.parent / f"{run.name}.log"
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        rc = subprocess.call(train_command(params, sets, data, run), env=env, stdout=fh,
                             stderr=subprocess.STDOUT, cwd=REPO)
    if rc != 0 or not (run / "model.pt").is_file():
        raise SystemExit(f"threads={threads}: cmbfe train exited {rc}; see {log}")
    print(f"threads={threads}: trained in {time.perf_counter() - t0:.0f} s -> {run}", flush=True)


def evaluate(cfg: C.Config, run: Path, data: Path, threads: int) -> dict[str, object]:
    """One CSV row: test and val AP of ``run`` (Table 2's evaluation, no bootstrap) and its training time."""
    from cmbfe.datadir import DataDir
    from cmbfe.study import evaluate_run

    aps = {}
    for split in ("test", "val"):
        aps[split] = (evaluate_run(cfg, run, data, split=split, bootstrap=0)["metrics"]["ap_voc"]
                      if DataDir(data).has_split(split) else float("nan"))
    info = json.loads((run / "model.json").read_text())
    return {"threads": threads, "test AP": round(float(aps["test"]), 4),
            "val AP": round(float(aps["val"]), 4), "train s": info.get("timings", {}).get("train_s"), "iterations": cfg.train.iterations,
            "run": str(run.relative_to(REPO) if run.is_relative_to(REPO) else run)}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """``CMBFE_THREADS=1`` (read by ``cmbfe.predict``) and torch on one thread; both restored on exit."""
    import torch

    before_env, before = os.environ.get("CMBFE_THREADS"), torch.get_num_threads()
    os.environ["CMBFE_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if before_env is None:
            os.environ.pop("CMBFE_THREADS", None)
        else:
            os.environ["CMBFE_THREADS"] = before_env


def spread(df: pd.DataFrame, column: str) -> float:
    """max - min of ``column`` over the thread counts."""
    return float(df[column].max() - df[column].min())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="default", help="profile name or params YAML (default: default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override passed to every run, e.g. model.heads=3")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    ap.add_argument("--data", type=Path, default=None, help="PRE folder (default: the profile's cached data)")
    ap.add_argument("--out", type=Path, default=None,
                    help="runs folder (default runs/<profile>/thread_invariance)")
    ap.add_argument("--results", type=Path, default=None,
                    help="CSV (default results[/<profile>]/thread_invariance.csv; under --out with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="smoke profile, 4 iterations: checks the script")
    args = ap.parse_args(argv)
    if any(t < 1 for t in args.threads) or len(set(args.threads)) != len(args.threads):
        ap.error("--threads: distinct counts >= 1")
    params = "smoke" if args.dry_run else args.params
    sets = ["train.seed=0", *(DRY_RUN_SETS if args.dry_run else []), *args.set]
    cfg = C.load(params, sets)
    out = args.out or cfg.runs_path() / "thread_invariance"
    results = args.results or (out / "thread_invariance.csv" if args.dry_run
                               else cfg.results_path() / "thread_invariance.csv")
    if args.data is not None:
        data = args.data
    else:
        from cmbfe.study import ensure_data

        data = ensure_data(cfg)
    for threads in args.threads:
        train(params, sets, data, run_dir(out, cfg, data, threads), threads)
    with one_thread():  # test predictions on one thread, the same for every model
        rows = [evaluate(cfg, run_dir(out, cfg, data, t), data, t) for t in args.threads]
    df = pd.DataFrame(rows, columns=COLUMNS)
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_name(f".{results.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(results)
    print(df.to_string(index=False))
    print(f"spread over threads {args.threads}: test AP {spread(df, 'test AP'):.4f}, "
          f"val AP {spread(df, 'val AP'):.4f} -> {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
