"""One exception type for every user-facing mistake.

Each error names the thing that is wrong and how to fix it; the CLI prints it in one
line (no traceback unless ``--debug``).
"""

from __future__ import annotations


class FedMoEError(Exception):
    """A user-facing error: ``what`` went wrong and ``fix`` says what to do about it."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(what if fix is None else f"{what} Fix: {fix}")


class ConfigError(FedMoEError):
    """An invalid configuration key or value."""


class ModelError(FedMoEError):
    """An unsupported model, or a model that cannot be loaded or sliced."""


class DataError(FedMoEError):
    """Missing or malformed data files."""


class BudgetError(FedMoEError):
    """A client's memory budget cannot hold what it must train."""


class RunStopped(FedMoEError):
    """The run stopped on purpose (e.g. too many empty rounds); its outputs so far are kept."""


class DataNotice(UserWarning):
    """Something about the data the user should know that is not an error (e.g. unusable rows dropped,
    counted); the CLI prints it as one ``note: …`` line."""
