"""User-facing errors: the one module that says what a failure means to the person at the terminal.

Every error a user can cause or fix is one of these, raised where the file, line or flag is known
(the io layer, the loaders, config validation) and printed by ``denselm.cli.main`` as one line.
Anything else is a bug and keeps its traceback.

Exit codes (the README's table):

    0  success
    1  a bug: an unexpected exception, printed with its traceback
    2  bad input or config (UserError): a flag, a config key, a data file's line, a missing input path
    3  the environment (EnvironmentProblem): disk full, permission denied, a missing model or optional extra

Library users catch ``DenseLMError`` (or a subclass); the ``ValueError`` bases keep old ``except ValueError``
code working.
"""

from __future__ import annotations


class DenseLMError(Exception):
    """Base of every user-facing error; ``exit_code`` is what the CLI returns."""

    exit_code = 2


class UserError(DenseLMError, ValueError):
    """Bad input or configuration: the message names the flag, key, or FILE:LINE: field."""

    exit_code = 2


class ConfigError(UserError):
    """A config key or command-line flag with a bad value; the message names it."""


class DataError(UserError):
    """A data file that cannot be used; the message starts with FILE:LINE where there is a line."""


class InputNotFound(UserError, FileNotFoundError):
    """An input path the user gave does not exist (``except FileNotFoundError`` still catches it)."""


class OutputExists(UserError, FileExistsError):
    """An output that would be replaced without the flag that allows it; the message names the flag."""


class EnvironmentProblem(DenseLMError):
    """The machine, not the input: disk full, permission denied, a model or package that is not there."""

    exit_code = 3


class ModelNotFound(EnvironmentProblem, FileNotFoundError):
    """A model (or packaged asset) that is neither a folder here nor reachable; says how to get it."""


class MissingExtraError(EnvironmentProblem, ImportError):
    """An optional dependency is not installed; the message says which extra to install."""

    def __init__(self, package: str, extra: str, purpose: str):
        self.package, self.extra = package, extra
        super().__init__(f"{purpose} needs the '{package}' package: pip install 'denselm[{extra}]'")


def require(module: str, extra: str, purpose: str, package: str | None = None):
    """Import an optional dependency or raise a one-line MissingExtraError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(package or module, extra, purpose) from None
