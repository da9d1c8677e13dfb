"""The error pymod-push's commands stop with: what went wrong and what to do."""

from __future__ import annotations


class InstallError(Exception):
    """What went wrong and what to do, for the admin."""
