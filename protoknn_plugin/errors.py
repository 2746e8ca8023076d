"""One exception type for every user-facing failure.

The CLI prints ``ProtoKNNError`` as a single line (no traceback) and exits non-zero,
so every message must name the problem *and* the fix.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class ProtoKNNError(Exception):
    """A user-facing error: one line naming the problem and the fix."""

    exit_code = 2


class UnknownNameError(ProtoKNNError, KeyError):
    """An unknown registry name (head, backbone, dataset, loss, ...)."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        msg = f"unknown {kind} {name!r}.{hint} Choose one of: {', '.join(known)}."
        super().__init__(msg)
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


def check(condition: bool, message: str) -> None:
    """Raise ``ProtoKNNError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ProtoKNNError(message)
