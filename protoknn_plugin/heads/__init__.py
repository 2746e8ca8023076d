"""The head registry: names map to head classes in one place.

Built-in heads register on import; third-party packages add theirs through the
entry-point group ``protoknn_plugin.heads`` (``name = "pkg.module:HeadClass"``) or
by calling ``register_head`` themselves.
"""
from __future__ import annotations

from typing import List

from ..registry import Registry
from .base import COMPONENTS, Head, Phase, PrototypeSpec

HEADS: Registry = Registry("head", entry_point_group="protoknn_plugin.heads")
register_head = HEADS.register


def create_head(name: str, **kwargs) -> Head:
    """Build a head by name from flat options through its ``from_options``, e.g.
    ``create_head("protoknn", num_classes=10, backbone_channels=128, dim=64, num_prototypes=100, reg=0.1)``."""
    head_class = HEADS.get(name)
    return getattr(head_class, "from_options", head_class)(**kwargs)


def get_head_class(name: str):
    return HEADS.get(name)


def list_heads() -> List[str]:
    return HEADS.names()


# Built-in heads register themselves on import.
from . import (  # noqa: E402,F401
    deformable_protopnet, pipnet, plain, protoknn, protopnet, protopool, prototree, tesnet,
)

__all__ = ["HEADS", "Head", "Phase", "PrototypeSpec", "COMPONENTS", "register_head", "create_head", "list_heads", "get_head_class"]
