"""The package's two error types, dependency-free so that any module can raise or catch them.

``ConfigError``: a params file, override or config value is malformed (the message names the key).
``InputError``: input data is unusable (the message names the file and what is wrong).
The CLI turns either into a one-line message and exit status 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A profile file or override is malformed; the message names the file and the key."""


class InputError(ValueError):
    """Input data is unusable; the message names the file and what is wrong."""
