"""What a run executes on and with: thread settings, device description, package versions.

Base layer (imports only `cmbfe.errors`, inside a function), so every layer may use it; torch is imported only
inside the functions that need it.

``CMBFE_THREADS`` (when set) fixes torch's intra-op thread count: tiny CPU models run fastest on one
thread, and the thread count can change float reductions. ``cmbfe reproduce`` sets it, with the OpenMP,
MKL and OpenBLAS pool sizes (:data:`THREAD_VARS`), for kernels it runs side by side.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

THREADS_ENV = "CMBFE_THREADS"
THREAD_VARS = (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""Environment variables that size torch's, OpenMP's, MKL's and OpenBLAS's thread pools."""
PACKAGES = ("cmbfe", "torch", "torchvision", "numpy", "scipy", "pydicom", "nibabel", "antspyx", "nilearn",
            "pillow", "pandas", "matplotlib", "scikit-learn", "papermill", "pycocotools")
"""Packages whose versions a provenance record lists."""


def env_threads() -> int | None:
    """The thread count ``CMBFE_THREADS`` asks for, or None when it is unset or empty."""
    value = os.environ.get(THREADS_ENV)
    return int(value) if value else None


def apply_thread_env() -> int:
    """Set torch's intra-op threads from ``CMBFE_THREADS`` when given; return the count before."""
    import torch

    before = torch.get_num_threads()
    n = env_threads()
    if n is not None:
        torch.set_num_threads(n)
    return before


def set_thread_env(threads: int) -> None:
    """Size every pool of :data:`THREAD_VARS` to ``threads`` for processes started from now on."""
    for var in THREAD_VARS:
        os.environ[var] = str(threads)


def device_description() -> dict[str, Any]:
    """What the run executes on: CPU model and cores, torch threads, and the GPU name when CUDA is
    available."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        dev["gpu"] = torch.cuda.get_device_name(0)
    return dev


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{package: version}`` (``not installed`` where missing) for ``packages``, plus ``python``."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error (``ConfigError``)."""
    import torch

    from cmbfe.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)
