"""Exact kNN kernels by squared L2: faiss's flat-L2 kernel on the CPU and a chunked torch matmul.

Both return squared distances ``dist`` (Q, k) ascending and item indices ``idx`` (Q, k).
"""
from __future__ import annotations

from typing import Optional, Tuple

import faiss
import numpy as np
import torch

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
        best_val, best_idx = _nearest_in_chunks(q, memory, memory_sq_norms, k, memory_chunk, buffer)
        dist = (best_val + squared_norms(q).unsqueeze(1)).clamp_min_(0.0)
        out_dist.append(dist)
        out_idx.append(best_idx)
    return torch.cat(out_dist), torch.cat(out_idx)


def _nearest_in_chunks(q: torch.Tensor, memory: torch.Tensor, memory_sq_norms: torch.Tensor, k: int,
                       memory_chunk: int, buffer: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k smallest ||m||^2 - 2 q.m of queries q (q, P) over the memory in chunks: values and indices (q, k)."""
    best_val = best_idx = None
    for m_start in range(0, memory.shape[0], memory_chunk):
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
    return best_val, best_idx


def faiss_knn_search(queries: np.ndarray, memory: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact kNN by squared L2 on the CPU with faiss's flat-L2 kernel (no index copy)."""
    dist, idx = faiss.knn(queries, memory, k, metric=faiss.METRIC_L2)
    return np.maximum(dist, 0.0, out=dist), idx


def numpy_queries(queries: torch.Tensor) -> np.ndarray:
    """(Q, P) queries as the contiguous float32 CPU array faiss takes."""
    return np.ascontiguousarray(queries.to("cpu", torch.float32).numpy())
