"""Search backends of the kNN classifier, registered by name (timm style).

- ``faiss``: exact squared L2 with faiss's flat-L2 kernel (``faiss.knn``, the kernel behind
  ``IndexFlatL2.search``; called on a zero-copy view of the buffer, so the memory is not
  duplicated into an index).
- ``faiss-gpu``: a GPU ``IndexFlatL2``, used instead of ``faiss`` when the installed faiss is
  faiss-gpu and sees a device.
- ``torch``: exact chunked ``||q||^2 - 2 q.m + ||m||^2`` + ``topk`` on the queries' device.
- ``ivfpq``: the (approximate) faiss IVF-PQ index of a ``memory="ivfpq"`` bank, always used for one.

Users pick ``auto``, ``faiss`` or ``torch`` (or a backend registered by another package with
``selectable = True``); ``resolve_backend`` turns the choice into the backend that searches.
A backend is stateless: whatever it derives from the bank it keeps in ``bank.cached``.
"""
from __future__ import annotations

from typing import List, Tuple

import faiss
import numpy as np
import torch

from ..errors import UnknownNameError
from ..registry import Registry
from .bank import MemoryBank
from .search import faiss_gpu_available, faiss_knn_search, numpy_queries, squared_norms, torch_knn_search

KNN_BACKENDS: Registry = Registry("kNN backend")
# The built-in choices a user has (the others are picked for them).
BACKENDS = ("auto", "faiss", "torch")


def register_knn_backend(name: str, *, overwrite: bool = False):
    """Class decorator: ``@register_knn_backend("mine") class Mine(KNNBackend): ...``."""
    return KNN_BACKENDS.register(name, overwrite=overwrite)


def create_knn_backend(name: str) -> "KNNBackend":
    return KNN_BACKENDS.create(name)


def list_knn_backends() -> List[str]:
    return KNN_BACKENDS.names()


def selectable_backends() -> Tuple[str, ...]:
    """What ``KNNClassifier(backend=...)`` accepts: ``auto`` and every selectable registered backend."""
    return ("auto", *(name for name in list_knn_backends() if KNN_BACKENDS.get(name).selectable))


def check_backend(backend: str) -> None:
    choices = selectable_backends()
    if backend not in choices:
        raise UnknownNameError("kNN backend", backend, choices)


def resolve_backend(backend: str, memory: str, queries: torch.Tensor) -> str:
    """The backend that searches a ``memory`` bank for ``queries`` when the user chose ``backend``."""
    if memory == "ivfpq":
        return "ivfpq"
    if backend not in ("auto", "faiss"):
        return backend
    if faiss_gpu_available():
        return "faiss-gpu"
    if backend == "auto" and queries.is_cuda:
        return "torch"
    return "faiss"


class KNNBackend:
    """One way to find the k nearest stored profiles by squared L2.

    ``search(bank, queries (Q, P), k)`` -> squared ``dist`` (Q, k) ascending and memory ``idx``
    (Q, k), both on the queries' device. ``search_items(queries (Q, P), items (M, P), k)`` is
    the exact search among a few given items (one class's members), by torch unless overridden.
    """

    name = "base"
    selectable = True  # False: picked for the user (faiss-gpu, ivfpq), never named by them

    def search(self, bank: MemoryBank, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def search_items(self, queries: torch.Tensor, items: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch_knn_search(queries, items, k)


@register_knn_backend("torch")
class TorchBackend(KNNBackend):
    name = "torch"

    def search(self, bank, queries, k):
        memory, sq_norms = bank.cached(("torch", queries.device), lambda: _device_copy(bank, queries.device))
        return torch_knn_search(queries, memory, k, memory_sq_norms=sq_norms)


def _device_copy(bank: MemoryBank, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    memory = bank.memory_profiles.to(device, torch.float32).contiguous()
    return memory, squared_norms(memory)


def _as_tensors(dist: np.ndarray, idx: np.ndarray, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(dist).to(device), torch.from_numpy(idx).long().to(device)


@register_knn_backend("faiss")
class FaissBackend(KNNBackend):
    name = "faiss"

    def search(self, bank, queries, k):
        dist, idx = faiss_knn_search(numpy_queries(queries), bank.numpy_profiles(), k)
        return _as_tensors(dist, idx, queries.device)

    def search_items(self, queries, items, k):
        if queries.is_cuda:
            return super().search_items(queries, items, k)
        dist, pos = faiss_knn_search(numpy_queries(queries), np.ascontiguousarray(items.numpy()), k)
        return torch.from_numpy(dist), torch.from_numpy(pos).long()


@register_knn_backend("faiss-gpu")
class FaissGpuBackend(FaissBackend):
    name = "faiss-gpu"
    selectable = False

    def search(self, bank, queries, k):
        _, index = bank.cached("faiss-gpu", lambda: _gpu_index(bank, queries))
        dist, idx = index.search(numpy_queries(queries), k)
        np.maximum(dist, 0.0, out=dist)
        return _as_tensors(dist, idx, queries.device)


def _gpu_index(bank: MemoryBank, queries: torch.Tensor):
    """(resources, GPU IndexFlatL2 of the bank); the resources must outlive the index."""
    cpu_index = faiss.IndexFlatL2(bank.dim)
    cpu_index.add(bank.numpy_profiles())
    device = queries.device.index if queries.is_cuda and queries.device.index is not None else 0
    resources = faiss.StandardGpuResources()
    return resources, faiss.index_cpu_to_gpu(resources, device, cpu_index)


@register_knn_backend("ivfpq")
class IvfpqBackend(KNNBackend):
    name = "ivfpq"
    selectable = False

    def search(self, bank, queries, k):
        index = bank.ivfpq_index()
        xq = numpy_queries(queries)
        dist, idx = index.search(xq, k)
        missing = (idx < 0).any(axis=1)
        if missing.any():
            # the probed lists held fewer than k items: probe every list for those queries
            ivf = faiss.extract_index_ivf(index)
            nprobe, ivf.nprobe = ivf.nprobe, ivf.nlist
            dist[missing], idx[missing] = index.search(np.ascontiguousarray(xq[missing]), k)
            ivf.nprobe = nprobe
        np.maximum(dist, 0.0, out=dist)
        return _as_tensors(dist, idx, queries.device)
