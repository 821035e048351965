"""Thread settings, device description and package versions (cmbfe.runtime)."""

from __future__ import annotations

import os

import torch

from cmbfe import runtime


def test_thread_env_is_applied_and_reported(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("CMBFE_THREADS", raising=False)
    assert runtime.env_threads() is None and runtime.apply_thread_env() == before
    assert torch.get_num_threads() == before
    monkeypatch.setenv("CMBFE_THREADS", "1")
    try:
        assert runtime.apply_thread_env() == before and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_set_thread_env_sizes_every_pool(monkeypatch):
    for var in runtime.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    runtime.set_thread_env(3)
    assert all(os.environ[v] == "3" for v in runtime.THREAD_VARS)


def test_device_and_versions():
    dev = runtime.device_description()
    assert dev["cpu_count"] == os.cpu_count() and isinstance(dev["cuda"], bool)
    v = runtime.package_versions(("numpy", "no-such-package-xyz"))
    assert v["no-such-package-xyz"] == "not installed" and v["numpy"][0].isdigit() and "python" in v
