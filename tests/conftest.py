"""Shared pytest configuration.

Hypothesis runs derandomized in CI (``CI`` set) so that a red build is reproducible from the clone alone;
locally it explores new examples each run. Failing examples found locally become explicit regression tests.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
