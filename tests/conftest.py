"""Shared pytest configuration.

Hypothesis runs derandomized in CI (``CI`` set) so that a red build is reproducible from the clone alone;
locally it explores new examples each run. Failing examples found locally become explicit regression tests.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread (``CMBFE_THREADS=1`` for code that reads it, torch set directly), restored after:
    tiny convs run faster than with 2 contending threads, and results are stable. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    monkeypatch.setenv("CMBFE_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
