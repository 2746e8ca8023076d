"""Reading pickled numpy data without letting the file run code.

A pickle names the callables that rebuild its objects, so ``pickle.load`` on a user's file
can run anything. ``NumpyOnlyUnpickler`` accepts only plain containers (dict, list, str,
bytes, numbers, which need no callable) and the few numpy callables that rebuild an array
and its dtype; any other name is refused with ``pickle.UnpicklingError``.
"""
from __future__ import annotations

import importlib
import io
import pickle

# (module, name) pairs that numpy arrays need, for pickles written by numpy 1.x
# ("numpy.core") and 2.x ("numpy._core"), protocols 2 to 5.
_ALLOWED = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol 2 written by Python 3 stores bytes as encode(str, "latin1")
})


def _resolve(module: str, name: str):
    """Import ``module.name``, mapping numpy 1.x's ``numpy.core`` onto numpy 2's ``numpy._core``."""
    candidates = [module]
    if module.startswith("numpy.core."):
        candidates.insert(0, "numpy._core." + module[len("numpy.core."):])
    elif module.startswith("numpy._core."):
        candidates.append("numpy.core." + module[len("numpy._core."):])
    for candidate in candidates:
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"cannot find {module}.{name} in this numpy")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and refuses every other callable."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return _resolve(module, name)


def safe_loads(data: bytes, encoding: str = "ASCII"):
    """``pickle.loads`` restricted to plain containers and numpy arrays.

    ``encoding="latin1"`` reads Python 2 pickles (such as CIFAR-10's batches) with str keys.
    Raises ``pickle.UnpicklingError`` (or EOFError/ValueError on a damaged file).
    """
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()
