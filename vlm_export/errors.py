"""Typed errors that the CLI turns into one line and exit code 2.

Why: users must never see a traceback from deep inside torch for bad input. Every
error a user can fix derives from `VlmExportError`; its message names the file or flag
and says what to do.
"""

from __future__ import annotations


class VlmExportError(Exception):
    """Base of every user-facing error (exit code 2)."""

    exit_code = 2


class InputError(VlmExportError):
    """A path, flag or file the user gave is missing, unreadable or malformed."""


class UnsupportedModelError(VlmExportError):
    """The model directory holds an architecture no family supports."""


class BundleError(VlmExportError):
    """A bundle is missing, incomplete, tampered with or from a newer format."""


class BackendUnavailableError(VlmExportError):
    """The requested runtime provider or backend cannot run on this machine."""
