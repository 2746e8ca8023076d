"""ProtoKNN inside CaBRNet (installed through the extra ``protoknn-plugin[cabrnet]``).

CaBRNet is heavy (about 1.4 GB), so it is imported lazily: importing this package
costs nothing, and touching a CaBRNet-backed name without the extra raises a
one-line error that names the extra.
"""
from __future__ import annotations

import importlib

from protoknn_plugin.errors import ProtoKNNError

_LAZY = {"ProtoKNNClassifier": ".classifier", "ProtoKNNCaBRNet": ".model"}


def require_cabrnet():
    try:
        return importlib.import_module("cabrnet")
    except ImportError:
        raise ProtoKNNError(
            "CaBRNet is not installed; install the extra with `pip install 'protoknn-plugin[cabrnet]'`"
        ) from None


def __getattr__(name):
    if name in _LAZY:
        require_cabrnet()
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(name)
