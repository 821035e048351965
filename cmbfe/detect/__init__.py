"""The scan tool wing: ``cmbfe detect`` (a scan in, a CMB report out) and the model it ships with.

Modules, each importing only those above it in this list (and the core; never :mod:`cmbfe.study`):

- :mod:`~cmbfe.detect.detector` — :class:`~cmbfe.detect.detector.Detector`: a model folder
  (:mod:`cmbfe.modelfolder`) with its operating threshold and training-slice geometry.
- :mod:`~cmbfe.detect.scans` — :class:`~cmbfe.detect.scans.Scan`, :class:`~cmbfe.detect.scans.Grid`:
  what ``INPUT`` holds and reading one scan.
- :mod:`~cmbfe.detect.pipeline` — preprocessing, inference, 3D merging, the lesion table
  (:class:`~cmbfe.detect.pipeline.ScanResult`).
- :mod:`~cmbfe.detect.report` — the PDF/HTML report of one scan.
- :mod:`~cmbfe.detect.outputs` — the files written per scan.
- :mod:`~cmbfe.detect.command` — ``run_detect`` and the ``cmbfe detect`` command.
- :mod:`~cmbfe.detect.lesion_metrics` — lesion-level numbers: the operating threshold, per-patient counts,
  a lesion list against ground truth.
- :mod:`~cmbfe.detect.export` — writing an exported model folder and its card from evaluated splits
  (choosing the run is :mod:`cmbfe.study.ship`).

Nothing is imported here, so ``import cmbfe.detect.scans`` does not load torch or matplotlib.
"""
