"""The extra ``protoknn-plugin[cabrnet]``: its absence is a one-line error that names it."""
from __future__ import annotations

from protoknn_plugin.extras import require_extra


def require_cabrnet():
    """The ``cabrnet`` module, or a one-line ``ProtoKNNError`` naming the extra to install."""
    return require_extra("cabrnet", "cabrnet", "ProtoKNN inside CaBRNet")
