"""Errors that the CLI reports as one clear message with exit code 2 (no traceback)."""

from __future__ import annotations


class DsftError(Exception):
    """A problem with the user's input (config, data, flags) that they can fix."""

    exit_code = 2


class ConfigError(DsftError):
    """The run config is invalid; the message names the key and how to fix it."""


class DataError(DsftError):
    """The data is invalid; the message names the file and row."""
