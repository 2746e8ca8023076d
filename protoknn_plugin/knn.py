"""ProtoKNN's classifier: majority vote of the k nearest stored training profiles.

Distances are squared Euclidean (docs/method.md, "Prediction"). Ties between classes
go to the tied class whose nearest member is closest. One search at the largest k serves
every k of ``predict_many`` (the paper reports k = 1, 3, 5, 10).

The memory bank lives in registered buffers, so ``model.state_dict()`` saves it and
``load_state_dict`` restores it into an empty classifier (the buffers are resized on load).
Search indices are never pickled: they are rebuilt lazily from the buffers.

Search backends (``backend=``):
- ``faiss``: exact squared L2 with faiss's flat-L2 kernel (``faiss.knn``, the kernel behind
  ``IndexFlatL2.search``; called on a zero-copy view of the buffer, so the memory is not
  duplicated into an index). If the installed faiss is faiss-gpu and sees a device, a GPU
  ``IndexFlatL2`` is used instead.
- ``torch``: exact chunked ``||q||^2 - 2 q.m + ||m||^2`` + ``topk`` on the queries' device.
- ``auto``: faiss-gpu if present, else ``torch`` for CUDA queries, else faiss on the CPU.
A ``memory="ivfpq"`` memory is always searched by its (approximate) faiss IVF-PQ index.
"""
from __future__ import annotations

import difflib
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import faiss
import numpy as np
import torch
from torch import nn

from .errors import ProtoKNNError, UnknownNameError, check
from .memory import (MEMORY_SELECTORS, build_ivfpq, deserialize_index, serialize_index)

MEMORY_KINDS = ("full", "condensed", "ivfpq")
BACKENDS = ("auto", "faiss", "torch")

# options each memory kind accepts (besides k, ks, num_classes, backend)
MEMORY_OPTIONS = {
    "full": (),
    "condensed": ("fraction", "per_class", "method", "seed", "niter", "batch"),
    "ivfpq": ("nlist", "m", "nbits", "nprobe", "seed"),
}
DEFAULT_NPROBE = 8

_BUFFERS = ("memory_profiles", "memory_labels", "memory_index", "memory_codes")

# float32 elements in one (query chunk x memory chunk) distance block of the torch path:
# 2**22 elements = 16 MiB (1024 queries x 4096 items): large enough that the GEMM runs at
# full speed, small enough to stay in the CPU's last-level cache between the GEMM that
# writes the block and the topk that reads it (larger blocks were slower on CPU;
# docs/history.md). On a GPU the blocks are larger (256 MiB), to amortise kernel launches.
TORCH_BLOCK_ELEMENTS = {"cpu": 2 ** 22, "cuda": 2 ** 26}
TORCH_QUERY_CHUNK = {"cpu": 1024, "cuda": 4096}


def faiss_gpu_available() -> bool:
    """True when the installed faiss is faiss-gpu and sees at least one device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# ---------------------------------------------------------------- search kernels
def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """(N, P) -> (N,) ||x_i||^2 without an (N, P) temporary (x.square() would copy the bank)."""
    return torch.linalg.vector_norm(x, dim=1).square()


def torch_knn_search(queries: torch.Tensor, memory: torch.Tensor, k: int,
                     memory_sq_norms: Optional[torch.Tensor] = None,
                     block_elements: Optional[int] = None,
                     query_chunk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact kNN by squared L2: (Q, P) x (N, P) -> dist (Q, k) ascending, idx (Q, k).

    Uses ||q||^2 - 2 q.m + ||m||^2 in blocks of at most ``block_elements`` distances. The
    ||q||^2 term does not change a row's ranking, so it is added only to the k winners.
    Runs on the device of ``queries`` and ``memory`` (which must match).
    """
    num_items = memory.shape[0]
    kind = "cuda" if queries.is_cuda else "cpu"
    block_elements = block_elements or TORCH_BLOCK_ELEMENTS[kind]
    query_chunk = query_chunk or TORCH_QUERY_CHUNK[kind]
    if memory_sq_norms is None:
        memory_sq_norms = squared_norms(memory)
    out_dist, out_idx = [], []
    query_chunk = max(1, min(query_chunk, queries.shape[0]))
    memory_chunk = max(k, block_elements // query_chunk)
    if memory_chunk > 256:
        # a multiple of 256 keeps the GEMM on its fast aligned kernels (1000 queries x 4194
        # items measured 1.25x slower than 1000 x 4096)
        memory_chunk -= memory_chunk % 256
    # one reused block buffer: a fresh 32 MiB tensor per chunk would cost page faults on CPU
    buffer = torch.empty(query_chunk * min(memory_chunk, num_items), dtype=queries.dtype, device=queries.device)
    for q_start in range(0, queries.shape[0], query_chunk):
        q = queries[q_start:q_start + query_chunk]
        best_val = best_idx = None
        for m_start in range(0, num_items, memory_chunk):
            m = memory[m_start:m_start + memory_chunk]
            partial = buffer[:q.shape[0] * m.shape[0]].view(q.shape[0], m.shape[0])
            # partial[i, j] = ||m_j||^2 - 2 q_i . m_j  (one fused GEMM)
            torch.addmm(memory_sq_norms[m_start:m_start + memory_chunk].unsqueeze(0),
                        q, m.t(), beta=1.0, alpha=-2.0, out=partial)
            val, idx = partial.topk(min(k, m.shape[0]), dim=1, largest=False, sorted=True)
            idx += m_start
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                merged_val = torch.cat([best_val, val], dim=1)
                merged_idx = torch.cat([best_idx, idx], dim=1)
                best_val, order = merged_val.topk(k, dim=1, largest=False, sorted=True)
                best_idx = merged_idx.gather(1, order)
        dist = (best_val + squared_norms(q).unsqueeze(1)).clamp_min_(0.0)
        out_dist.append(dist)
        out_idx.append(best_idx)
    return torch.cat(out_dist), torch.cat(out_idx)


def faiss_knn_search(queries: np.ndarray, memory: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact kNN by squared L2 on the CPU with faiss's flat-L2 kernel (no index copy)."""
    dist, idx = faiss.knn(queries, memory, k, metric=faiss.METRIC_L2)
    return np.maximum(dist, 0.0, out=dist), idx


def majority_vote(neighbour_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote over (Q, k) neighbour labels ordered nearest first -> (Q,) classes.

    Ties go to the tied class whose nearest member ranks first (is closest). Vectorised:
    counts (Q, C) by scatter-add, first-occurrence rank (Q, C) by scatter-amin, and the
    score count * (k + 1) + (k - first_rank) orders classes by count, then by rank.
    """
    num_queries, k = neighbour_labels.shape
    labels = neighbour_labels.long()
    counts = torch.zeros(num_queries, num_classes, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    ranks = torch.arange(k, device=labels.device).expand(num_queries, k)
    first_rank = torch.full((num_queries, num_classes), k, dtype=torch.long, device=labels.device)
    first_rank.scatter_reduce_(1, labels, ranks, reduce="amin")
    score = counts * (k + 1) + (k - first_rank)
    return score.argmax(dim=1)


# ---------------------------------------------------------------- classifier
class KNNClassifier(nn.Module):
    """kNN over stored prototype profiles, majority vote, squared L2.

    Buffers (saved by ``state_dict``): ``memory_profiles`` (N, P) float32 (empty (0, P) for
    ivfpq, whose profiles exist only as PQ codes), ``memory_labels`` (N,) int64,
    ``memory_index`` (N,) int64 (the original training index of each kept item) and
    ``memory_codes`` (B,) uint8 (the serialised faiss IVF-PQ index; empty otherwise).
    Search results index the memory bank (0..N-1); ``memory_index[idx]`` maps them back
    to the training set.
    """

    def __init__(self, k: int = 5, ks: Sequence[int] = (1, 3, 5, 10), memory: str = "full",
                 num_classes: Optional[int] = None, backend: str = "auto", **memory_options):
        super().__init__()
        if memory not in MEMORY_KINDS:
            raise UnknownNameError("kNN memory", memory, MEMORY_KINDS)
        if backend not in BACKENDS:
            raise UnknownNameError("kNN backend", backend, BACKENDS)
        check(not (memory == "ivfpq" and backend == "torch"),
              "backend='torch' cannot search an ivfpq memory (it holds PQ codes, not profiles); "
              "use backend='auto' or 'faiss', or memory='full'")
        _check_options(memory, memory_options)
        self.k = _check_k(k, "k")
        self.ks = tuple(_check_k(value, "ks") for value in ks)
        check(len(self.ks) > 0, "ks is empty; pass e.g. ks=(1, 3, 5, 10)")
        check(num_classes is None or (isinstance(num_classes, int) and num_classes >= 1),
              f"num_classes={num_classes!r} must be a positive int or None (inferred from the labels)")
        self.memory = memory
        self.backend = backend
        self.memory_options = dict(memory_options)
        self.num_classes = num_classes
        self.fitted_num_classes: Optional[int] = None  # num_classes, or inferred at fit
        self.dim: Optional[int] = None  # P of the stored profiles
        self.register_buffer("memory_profiles", torch.empty(0, 0, dtype=torch.float32))
        self.register_buffer("memory_labels", torch.empty(0, dtype=torch.long))
        self.register_buffer("memory_index", torch.empty(0, dtype=torch.long))
        self.register_buffer("memory_codes", torch.empty(0, dtype=torch.uint8))
        self._invalidate()

    # ------------------------------------------------------------ building the memory
    @torch.no_grad()
    def fit(self, profiles: torch.Tensor, labels: torch.Tensor) -> "KNNClassifier":
        """Store the memory bank from training ``profiles`` (N, P) and ``labels`` (N,)."""
        profiles = _check_profiles(profiles, "fit")
        labels = self._check_labels(labels, profiles.shape[0])
        num_classes = self.num_classes if self.num_classes is not None else int(labels.max()) + 1
        device = self.memory_labels.device
        if self.memory == "ivfpq":
            options = {key: value for key, value in self.memory_options.items() if key != "nprobe"}
            index = build_ivfpq(profiles, **options)
            self._set_buffers(profiles=torch.empty(0, profiles.shape[1]),
                              labels=labels, index=torch.arange(len(labels)),
                              codes=serialize_index(index), device=device)
        else:
            kept = MEMORY_SELECTORS.create(self.memory, profiles=profiles, labels=labels,
                                           **self.memory_options)
            self._set_buffers(profiles=profiles[kept], labels=labels[kept], index=kept,
                              codes=torch.empty(0, dtype=torch.uint8), device=device)
        self.fitted_num_classes = num_classes
        self.dim = profiles.shape[1]
        return self

    def _set_buffers(self, profiles, labels, index, codes, device) -> None:
        self.memory_profiles = profiles.to(device, torch.float32).contiguous()
        self.memory_labels = labels.to(device, torch.long).contiguous()
        self.memory_index = index.to(device, torch.long).contiguous()
        self.memory_codes = codes.to(device, torch.uint8).contiguous()
        self._invalidate()

    def _check_labels(self, labels: torch.Tensor, num_items: int) -> torch.Tensor:
        check(isinstance(labels, torch.Tensor), f"fit labels must be a tensor (N,), got {type(labels).__name__}")
        check(labels.dim() == 1 and labels.shape[0] == num_items,
              f"fit got labels of shape {tuple(labels.shape)} for {num_items} profiles; pass one class index per profile, shape ({num_items},)")
        check(not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool,
              f"fit labels have dtype {labels.dtype}; pass integer class indices (torch.long)")
        labels = labels.detach().to("cpu", torch.long)
        check(int(labels.min()) >= 0, f"fit labels contain {int(labels.min())}; class indices must be >= 0")
        if self.num_classes is not None:
            check(int(labels.max()) < self.num_classes,
                  f"fit labels contain class {int(labels.max())} but num_classes={self.num_classes}; "
                  f"raise num_classes or pass num_classes=None")
        return labels

    # ------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        return {"memory": self.memory, "memory_options": dict(self.memory_options),
                "num_classes": self.fitted_num_classes, "dim": self.dim}

    def set_extra_state(self, state: dict) -> None:
        check(isinstance(state, dict) and state.get("memory") in MEMORY_KINDS,
              "the saved kNN state has no valid memory kind; save it with KNNClassifier.state_dict()")
        self.memory = state["memory"]
        self.memory_options = dict(state.get("memory_options") or {})
        self.fitted_num_classes = state.get("num_classes")
        self.dim = state.get("dim")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # the memory bank's size is data, not architecture: resize our buffers to the
        # incoming shapes so the default copy_ succeeds
        for name in _BUFFERS:
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, torch.Tensor):
                current = self._buffers[name]
                self._buffers[name] = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if self.dim is None and self.memory_profiles.dim() == 2 and self.memory_profiles.shape[1] > 0:
            self.dim = self.memory_profiles.shape[1]
        if len(self) and self.fitted_num_classes is None:
            self.fitted_num_classes = int(self.memory_labels.max()) + 1
        self._invalidate()

    def state_dict_extra(self) -> dict:
        """The memory bank and its description as a plain dict (same as ``state_dict()``)."""
        return dict(self.state_dict())

    def load_state(self, state: dict) -> "KNNClassifier":
        """Restore from ``state_dict_extra()`` / ``state_dict()`` output (any memory size)."""
        self.load_state_dict(state)
        return self

    def _apply(self, fn, *args, **kwargs):
        self._invalidate()  # cached device copies and indices follow the buffers
        return super()._apply(fn, *args, **kwargs)

    def _invalidate(self) -> None:
        self._torch_cache: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._cpu_memory: Optional[np.ndarray] = None
        self._faiss_gpu_index = None
        self._ivfpq_index = None

    # ------------------------------------------------------------ info
    def __len__(self) -> int:
        return int(self.memory_labels.shape[0])

    def memory_bytes(self) -> int:
        """Bytes the memory keeps: every buffer (profiles or PQ codes, labels, indices)."""
        return sum(buf.numel() * buf.element_size() for buf in
                   (self.memory_profiles, self.memory_labels, self.memory_index, self.memory_codes))

    def extra_repr(self) -> str:
        return (f"k={self.k}, ks={self.ks}, memory={self.memory!r}, backend={self.backend!r}, "
                f"items={len(self)}, dim={self.dim}")

    # ------------------------------------------------------------ search
    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """k nearest memory items: squared L2 ``dist`` (Q, k) ascending and memory ``idx`` (Q, k)."""
        queries = self._check_queries(queries)
        self._check_k_fits(k)
        return self._search(queries, k)

    def _search(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        backend = self._resolve_backend(queries)
        if backend == "torch":
            memory, sq_norms = self._torch_memory(queries.device)
            return torch_knn_search(queries, memory, k, memory_sq_norms=sq_norms)
        xq = _numpy_queries(queries)
        if backend == "ivfpq":
            dist, idx = self._ivfpq_search(xq, k)
        elif backend == "faiss-gpu":
            dist, idx = self._gpu_index(queries).search(xq, k)
            np.maximum(dist, 0.0, out=dist)
        else:
            dist, idx = faiss_knn_search(xq, self._numpy_memory(), k)
        return (torch.from_numpy(dist).to(queries.device), torch.from_numpy(idx).long().to(queries.device))

    def _resolve_backend(self, queries: torch.Tensor) -> str:
        if self.memory == "ivfpq":
            return "ivfpq"
        if self.backend == "torch":
            return "torch"
        if faiss_gpu_available():
            return "faiss-gpu"
        if self.backend == "auto" and queries.is_cuda:
            return "torch"
        return "faiss"

    def _torch_memory(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        if device not in self._torch_cache:
            memory = self.memory_profiles.to(device, torch.float32).contiguous()
            self._torch_cache[device] = (memory, squared_norms(memory))
        return self._torch_cache[device]

    def _numpy_memory(self) -> np.ndarray:
        if self._cpu_memory is None:
            self._cpu_memory = np.ascontiguousarray(self.memory_profiles.detach().to("cpu", torch.float32).numpy())
        return self._cpu_memory

    def _gpu_index(self, queries: torch.Tensor):
        if self._faiss_gpu_index is None:
            cpu_index = faiss.IndexFlatL2(self.dim)
            cpu_index.add(self._numpy_memory())
            device = queries.device.index if queries.is_cuda and queries.device.index is not None else 0
            self._faiss_gpu_resources = faiss.StandardGpuResources()
            self._faiss_gpu_index = faiss.index_cpu_to_gpu(self._faiss_gpu_resources, device, cpu_index)
        return self._faiss_gpu_index

    def _ivfpq(self):
        if self._ivfpq_index is None:
            nprobe = self.memory_options.get("nprobe", DEFAULT_NPROBE)
            self._ivfpq_index = deserialize_index(self.memory_codes, nprobe)
        return self._ivfpq_index

    def _ivfpq_search(self, xq: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        index = self._ivfpq()
        dist, idx = index.search(xq, k)
        missing = (idx < 0).any(axis=1)
        if missing.any():
            # the probed lists held fewer than k items: probe every list for those queries
            ivf = faiss.extract_index_ivf(index)
            nprobe, ivf.nprobe = ivf.nprobe, ivf.nlist
            dist[missing], idx[missing] = index.search(np.ascontiguousarray(xq[missing]), k)
            ivf.nprobe = nprobe
        return np.maximum(dist, 0.0, out=dist), idx

    # ------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, queries: torch.Tensor) -> torch.Tensor:
        """Majority vote at ``self.k``: (Q, P) -> (Q,) class indices."""
        return self.predict_many(queries, ks=(self.k,))[self.k]

    @torch.no_grad()
    def predict_many(self, queries: torch.Tensor, ks: Optional[Iterable[int]] = None) -> Dict[int, torch.Tensor]:
        """Predictions for every k in ``ks`` (default ``self.ks``) from ONE search at max(ks)."""
        ks = tuple(_check_k(value, "ks") for value in (self.ks if ks is None else ks))
        check(len(ks) > 0, "predict_many got an empty ks; pass e.g. ks=(1, 3, 5, 10)")
        queries = self._check_queries(queries)
        self._check_k_fits(max(ks))
        _, idx = self._search(queries, max(ks))
        labels = self.memory_labels.to(idx.device)[idx]
        return {k: majority_vote(labels[:, :k], self.fitted_num_classes) for k in ks}

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.predict(queries)

    @torch.no_grad()
    def nearest_of_class(self, queries: torch.Tensor, cls: Union[int, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest memory item of class ``cls`` (an int, or (Q,) classes) to each query.

        Returns squared L2 ``dist`` (Q,) and memory ``idx`` (Q,) (for counterfactuals: the
        negative of sec. 2.4). For ivfpq the class members' PQ reconstructions are searched.
        """
        queries = self._check_queries(queries)
        num_queries = queries.shape[0]
        if isinstance(cls, torch.Tensor) and cls.dim() > 0:
            check(cls.shape == (num_queries,),
                  f"nearest_of_class got classes of shape {tuple(cls.shape)}; pass an int or one class per query ({num_queries},)")
            classes = cls.detach().to("cpu", torch.long)
        else:
            classes = torch.full((num_queries,), int(cls), dtype=torch.long)
        labels = self.memory_labels.cpu()
        dist = torch.empty(num_queries, dtype=torch.float32, device=queries.device)
        idx = torch.empty(num_queries, dtype=torch.long, device=queries.device)
        for value in classes.unique().tolist():
            members = torch.nonzero(labels == value).squeeze(1)
            check(len(members) > 0,
                  f"class {value} has no item in the kNN memory (classes stored: {_class_summary(labels)}); "
                  f"pick a stored class, or use memory='full' so every training class is kept")
            rows = torch.nonzero(classes == value).squeeze(1).to(queries.device)
            class_dist, class_pos = self._search_subset(queries[rows], members)
            dist[rows] = class_dist
            idx[rows] = members.to(queries.device)[class_pos]
        return dist, idx

    def _search_subset(self, queries: torch.Tensor, members: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """1-NN of (q, P) queries among memory rows ``members`` -> dist (q,), position in members (q,)."""
        subset = self.profiles_of(members).to(queries.device)
        backend = self._resolve_backend(queries)
        if backend in ("torch", "ivfpq") or queries.is_cuda:
            dist, pos = torch_knn_search(queries, subset, 1)
            return dist[:, 0], pos[:, 0]
        dist, pos = faiss_knn_search(_numpy_queries(queries), np.ascontiguousarray(subset.numpy()), 1)
        return torch.from_numpy(dist[:, 0]), torch.from_numpy(pos[:, 0]).long()

    @torch.no_grad()
    def profiles_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Stored profiles of memory items ``idx`` (...,) -> (..., P) float32, on idx's device.

        Exact for full/condensed memories; PQ reconstructions (approximate) for ivfpq.
        """
        self._check_fitted("profiles_of")
        idx = torch.as_tensor(idx, dtype=torch.long)
        check(idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < len(self)),
              f"profiles_of got memory indices outside 0..{len(self) - 1}; pass indices returned by search")
        if self.memory != "ivfpq":
            return self.memory_profiles[idx.to(self.memory_profiles.device)].to(idx.device)
        flat = idx.reshape(-1).cpu().numpy().astype(np.int64)
        rebuilt = self._ivfpq().reconstruct_batch(flat) if len(flat) else np.empty((0, self.dim), np.float32)
        return torch.from_numpy(rebuilt).reshape(*idx.shape, self.dim).to(idx.device)

    # ------------------------------------------------------------ validation
    def _check_fitted(self, action: str) -> None:
        check(len(self) > 0,
              f"the kNN memory is empty: call fit(train_profiles, train_labels) or load a saved state before {action}")

    def _check_queries(self, queries: torch.Tensor) -> torch.Tensor:
        self._check_fitted("searching")
        queries = _check_profiles(queries, "queries")
        check(queries.shape[1] == self.dim,
              f"queries have {queries.shape[1]} prototype scores per row but the kNN memory stores {self.dim}; "
              f"use profiles from the model whose training profiles were stored")
        return queries

    def _check_k_fits(self, k: int) -> None:
        _check_k(k, "k")
        check(k <= len(self),
              f"k={k} is larger than the {len(self)} stored training profiles; lower k or store more profiles"
              + (" (memory='full' keeps every training profile)" if self.memory == "condensed" else ""))


# ---------------------------------------------------------------- helpers
def _check_k(k, name: str) -> int:
    check(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1,
          f"{name}={k!r} is not a valid number of neighbours; pass a positive integer")
    return int(k)


def _check_profiles(profiles, what: str) -> torch.Tensor:
    """(N, P) finite floating tensor -> float32 contiguous (detached)."""
    check(isinstance(profiles, torch.Tensor), f"{what} must be a tensor (N, P), got {type(profiles).__name__}")
    check(profiles.dim() == 2,
          f"{what} must have shape (N, P), got {tuple(profiles.shape)}; for one profile use profile.unsqueeze(0)")
    check(profiles.shape[0] > 0 and profiles.shape[1] > 0,
          f"{what} is empty (shape {tuple(profiles.shape)}); pass at least one profile with at least one prototype score")
    check(profiles.is_floating_point(), f"{what} have dtype {profiles.dtype}; pass floating-point prototype profiles")
    profiles = profiles.detach().to(dtype=torch.float32).contiguous()
    # a NaN or inf anywhere makes the sum non-finite; the sum needs no (N, P) temporary,
    # so the exact count runs only in that (rare) case, which huge finite values may also hit
    bad = 0 if torch.isfinite(profiles.sum()) else int((~torch.isfinite(profiles)).sum())
    check(bad == 0, f"{what} contain {bad} non-finite values (NaN or inf); check the model's outputs "
                    f"(e.g. a diverged training run) before the kNN step")
    return profiles


def _numpy_queries(queries: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(queries.to("cpu", torch.float32).numpy())


def _class_summary(labels: torch.Tensor) -> str:
    classes = labels.unique().tolist()
    shown = ", ".join(str(c) for c in classes[:10])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")


def _check_options(memory: str, options: dict) -> None:
    allowed = MEMORY_OPTIONS[memory]
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ProtoKNNError(f"unknown option {key!r} for memory={memory!r}.{hint} "
                                f"Options: {', '.join(allowed) if allowed else 'none'}.")
