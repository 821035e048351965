"""The hold-out cohort: a second test cohort, synthesised from its own seed, that nothing is chosen on.

:func:`make_holdout` synthesises it with the study's generator (:func:`cmbfe.synth.synthesize_cohort`: the
``synth`` section's settings with ``holdout.seed`` and ``holdout.patients``; patients ``HOLD-0001`` ...) and
preprocesses it with the study's :func:`cmbfe.preprocess.preprocess_cohort` (the ``preprocess`` section: the
same N4, normalisation and label model) into one split ``holdout``, built as the test split is: every CMB
slice plus ``preprocess.test_negatives_ratio`` mimic-only slices per CMB slice (and ``holdout_geometric``
with the geometric boxes, as ``test_geometric``). Files (:func:`holdout_raw`, :func:`holdout_pre`):
``Config.holdout_path()/raw`` (DICOM, ``lesions.csv`` per patient) and ``/pre`` (a
:class:`cmbfe.datadir.DataDir` with ``annotations/holdout.json``, ``lesions.csv``, ``splits.csv`` ...).

Usage: ``python -m cmbfe.holdout --params default [--set holdout.patients=20] [--overwrite]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from cmbfe.config import Config, SynthConfig, load
from cmbfe.errors import ConfigError, InputError
from cmbfe.preprocess import preprocess_cohort
from cmbfe.synth import synthesize_cohort

HOLDOUT_SPLIT = "holdout"
"""The one split of the hold-out PRE folder (``PRE/annotations/holdout.json``)."""
HOLDOUT_PREFIX = "HOLD"
"""Patient ids of the hold-out cohort: ``HOLD-0001`` ... (the study's are ``SYN-0001`` ...)."""


def holdout_synth(cfg: Config) -> SynthConfig:
    """The ``synth`` section with the hold-out cohort's ``seed`` and number of ``patients``."""
    return dataclasses.replace(cfg.synth, seed=cfg.holdout.seed, patients=cfg.holdout.patients)


def holdout_raw(cfg: Config) -> Path:
    """The hold-out cohort's DICOM folder: ``Config.holdout_path()/raw``."""
    return cfg.holdout_path() / "raw"


def holdout_pre(cfg: Config) -> Path:
    """The hold-out cohort's PRE folder (split ``holdout``): ``Config.holdout_path()/pre``."""
    return cfg.holdout_path() / "pre"


def make_holdout(cfg: Config, *, raw: Path | None = None, pre: Path | None = None, progress: bool = True,
                 overwrite: bool = False) -> Path:
    """Synthesise and preprocess the hold-out cohort of ``cfg`` (module docstring) into ``raw`` and ``pre``
    (default :func:`holdout_raw`, :func:`holdout_pre`); returns PRE. Each folder is written atomically; an
    existing non-empty one is an error unless ``overwrite``. ``holdout.patients: 0`` is a ConfigError."""
    if cfg.holdout.patients < 1:
        raise ConfigError(f"holdout.patients: profile {cfg.profile} has no hold-out cohort (0 patients)")
    raw = Path(raw) if raw is not None else holdout_raw(cfg)
    pre = Path(pre) if pre is not None else holdout_pre(cfg)
    synthesize_cohort(raw, holdout_synth(cfg), progress=progress, overwrite=overwrite, prefix=HOLDOUT_PREFIX)
    preprocess_cohort(raw, pre, cfg, overwrite=overwrite, progress=progress, split=HOLDOUT_SPLIT)
    return pre


def main(argv: list[str] | None = None) -> int:
    """``python -m cmbfe.holdout --params P [--set k=v] [--raw DIR] [--out PRE] [--overwrite]``."""
    ap = argparse.ArgumentParser(prog="python -m cmbfe.holdout", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=None, help="profile name (smoke/default/paper) or params YAML file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. holdout.patients=20")
    ap.add_argument("--raw", type=Path, default=None, help="DICOM folder (default <data_dir>/holdout/raw)")
    ap.add_argument("--out", type=Path, default=None, help="PRE folder (default <data_dir>/holdout/pre)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing folders")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    cfg = load(args.params, args.set)
    t0 = time.perf_counter()
    pre = make_holdout(cfg, raw=args.raw, pre=args.out, progress=not args.no_progress,
                       overwrite=args.overwrite)
    print(f"hold-out cohort: {cfg.holdout.patients} patients (seed {cfg.holdout.seed}) -> {pre} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except (ConfigError, InputError) as e:
        print(f"cmbfe.holdout: error: {e}", file=sys.stderr)
        sys.exit(2)
