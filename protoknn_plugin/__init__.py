"""protoknn: ProtoKNN (ICLR 2023) for prototype networks.

One shared prototype layer feeds interchangeable heads chosen by name
(``protoknn``, ``protopnet``, ``cnn`` and any third-party head registered through
the ``protoknn_plugin.heads`` entry-point group).
"""
from .errors import ProtoKNNError

__version__ = "0.1.0"
__all__ = ["ProtoKNNError", "__version__"]
