"""ProtoKNN's classifier: majority vote of the k nearest stored training profiles.

Distances are squared Euclidean (docs/method.md, "Prediction"). Ties between classes
go to the tied class whose nearest member is closest. One search at the largest k serves
every k of ``predict_many`` (the paper reports k = 1, 3, 5, 10).

Three parts: the memory bank (``bank.MemoryBank``: buffers saved by ``state_dict``, restored
into an empty classifier; search indices are never pickled but rebuilt lazily from the buffers),
the search backends (``backends``: ``faiss`` by default, ``torch``, ``faiss-gpu`` and ``ivfpq``,
registered by name) and the vote (``vote.MajorityVote``). ``KNNClassifier`` puts them together.
"""
from __future__ import annotations

from .backends import (BACKENDS, KNN_BACKENDS, KNNBackend, create_knn_backend, list_knn_backends,
                       register_knn_backend, resolve_backend, selectable_backends)
from .bank import DEFAULT_NPROBE, MEMORY_KINDS, MEMORY_OPTIONS, MemoryBank
from .classifier import KNNClassifier
from .search import (TORCH_BLOCK_ELEMENTS, TORCH_QUERY_CHUNK, faiss_gpu_available, faiss_knn_search, squared_norms,
                     torch_knn_search)
from .vote import MajorityVote, majority_vote

__all__ = [
    "KNNClassifier", "MemoryBank", "MajorityVote", "majority_vote", "KNNBackend", "KNN_BACKENDS", "BACKENDS",
    "register_knn_backend", "create_knn_backend", "list_knn_backends", "resolve_backend", "selectable_backends",
    "MEMORY_KINDS", "MEMORY_OPTIONS", "DEFAULT_NPROBE", "TORCH_BLOCK_ELEMENTS", "TORCH_QUERY_CHUNK",
    "faiss_gpu_available", "faiss_knn_search", "squared_norms", "torch_knn_search",
]
