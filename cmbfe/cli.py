"""The ``cmbfe`` command: ``cmbfe <stage> ...`` dispatches to ``cmbfe.<module>.main(argv)``.

Every stage module owns its argparse parser; errors in user input (``ConfigError``, ``InputError``)
become one line on stderr and exit status 2, nothing half-written. Stage modules are imported only when
their command runs (``importlib``), so ``cmbfe --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

from cmbfe import __version__
from cmbfe.errors import ConfigError, InputError

COMMANDS = {
    "synth": ("cmbfe.synth", "generate the synthetic SWI cohort as DICOM series + ground truth"),
    "preprocess": ("cmbfe.preprocess", "N4, normalise, slice to PNG, split by patient, COCO JSON"),
    "train": ("cmbfe.train", "train an SSD (optionally with feature enhancement)"),
    "predict": ("cmbfe.predict", "run a trained checkpoint on a split and write COCO detections"),
    "evaluate": ("cmbfe.evaluate", "AP, sensitivity/precision, FROC, FP/CMB, bootstrap CIs"),
    "reproduce": ("cmbfe.study.reproduce", "run the numbered notebooks for a profile with papermill"),
    "detect": ("cmbfe.detect.command",
               "a scan (DICOM/NIfTI) or a folder of patients in, CMB list + mask + report out"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cmbfe`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: cmbfe <command> [options]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<11} {doc}")
        print("\n'cmbfe <command> --help' for a command's options.")
        return 0 if argv else 2
    if argv[0] in ("--version",):
        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"cmbfe: unknown command '{cmd}' (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    try:
        return int(module.main(rest) or 0)
    except (ConfigError, InputError) as e:
        print(f"cmbfe {cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
