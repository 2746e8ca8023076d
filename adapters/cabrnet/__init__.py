"""ProtoKNN inside CaBRNet (installed through the extra ``protoknn-plugin[cabrnet]``).

CaBRNet is heavy (about 1.4 GB), so it is imported lazily: importing this package
costs nothing, and touching a CaBRNet-backed name without the extra raises a
one-line error that names the extra. Its rows in ``protoknn benchmark``
(``cabrnet:protopnet``, ``cabrnet:prototree``) come from the run backend in ``backend``.
"""
from __future__ import annotations

import importlib

from . import backend  # noqa: F401  (registers the run backend ``cabrnet``; needs no CaBRNet)
from .extra import require_cabrnet

__all__ = ["require_cabrnet", "ProtoKNNClassifier", "ProtoKNNCaBRNet"]

_LAZY = {"ProtoKNNClassifier": ".classifier", "ProtoKNNCaBRNet": ".model"}


def __getattr__(name):
    if name in _LAZY:
        require_cabrnet()
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(name)
