"""Exceptions raised for bad user input.

Every error a user can cause by what they pass in (a path, a file, a format name, a budget)
is an :class:`AutobitsError`; the CLI turns it into a one-line message and exit code 2.
"""

from __future__ import annotations

__all__ = ["AutobitsError", "FormatError", "ModelLoadError", "BudgetError", "AllocationError",
           "MemoryBudgetError"]


class AutobitsError(ValueError):
    """Base class of every user-facing error (a ValueError, so library users can catch it)."""


class FormatError(AutobitsError):
    """Unknown format name, or a format that does not fit a tensor's shape or values."""


class ModelLoadError(AutobitsError):
    """Missing, unreadable, corrupt, truncated or unsupported model file."""


class BudgetError(AutobitsError):
    """A size budget that no allocation can meet."""


class AllocationError(AutobitsError):
    """An allocation that does not match the model (unknown tensors, misfit formats)."""


class MemoryBudgetError(AutobitsError):
    """A run whose estimated peak memory exceeds what the machine has available."""
