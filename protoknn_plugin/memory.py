"""Compact kNN memories: which training profiles the kNN classifier keeps, and how.

ProtoKNN stores the profile of every training image (``full``). That is exact but grows
with the training set, so two compact memories go beyond the paper:

- ``condensed`` keeps a subset of real training samples per class (each kept item keeps
  its original training index, so explanations can still show the actual image):
  ``method="kmeans"`` runs per-class k-means (``faiss.Kmeans``) and keeps the training
  profile nearest to each centroid; ``method="cnn"`` is Hart's condensed nearest
  neighbour, which keeps just enough samples for 1-NN to classify every training profile
  correctly.
- ``ivfpq`` stores a trained faiss ``IndexIVFPQ`` (product-quantised codes; the float
  profiles are not kept) serialised to bytes.

Selection functions map ``(profiles (N, P), labels (N,)) -> kept (M,)`` sorted training
indices; they are registered by name in ``MEMORY_SELECTORS``.
"""
from __future__ import annotations

import math
from typing import Optional

import faiss
import numpy as np
import torch

from .errors import check
from .registry import Registry

MEMORY_SELECTORS: Registry = Registry("kNN memory")

CONDENSE_METHODS = ("kmeans", "cnn")


@MEMORY_SELECTORS.register("full")
def keep_all(profiles: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep every training profile: (N,) indices 0..N-1."""
    return torch.arange(len(labels), dtype=torch.long)


@MEMORY_SELECTORS.register("condensed")
def condense(
    profiles: torch.Tensor,
    labels: torch.Tensor,
    fraction: float = 0.1,
    per_class: Optional[int] = None,
    method: str = "kmeans",
    seed: int = 0,
    niter: int = 20,
    batch: int = 256,
) -> torch.Tensor:
    """Indices (M,) of the training profiles a condensed memory keeps, sorted.

    ``kmeans``: class c keeps at most ``per_class`` items (default
    ``max(1, floor(fraction * N_c))``), the training profile nearest to each centroid
    (two centroids may share one, so it can keep fewer). ``cnn``: Hart's condensed
    nearest neighbour; ``fraction``/``per_class`` do not apply, the data decide the size.
    """
    check(method in CONDENSE_METHODS,
          f"unknown condensed-memory method {method!r}; choose one of {', '.join(CONDENSE_METHODS)}")
    if method == "cnn":
        return hart_condense(profiles, labels, seed=seed, batch=batch)
    check(0.0 < fraction <= 1.0,
          f"condensed memory fraction={fraction} is outside (0, 1]; pass e.g. fraction=0.1")
    check(per_class is None or per_class >= 1,
          f"condensed memory per_class={per_class} must be at least 1; pass per_class=None to use fraction")
    x = _as_numpy(profiles)
    y = labels.cpu().numpy()
    kept = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        count = per_class if per_class is not None else max(1, int(math.floor(fraction * len(members))))
        if count >= len(members):
            kept.append(members)
            continue
        kept.append(members[_nearest_to_centroids(x[members], count, seed=seed, niter=niter)])
    return torch.from_numpy(np.sort(np.concatenate(kept))).long()


def _nearest_to_centroids(x: np.ndarray, count: int, seed: int, niter: int) -> np.ndarray:
    """Row indices (<= count,) of ``x`` (n, P) nearest to each of ``count`` k-means centroids."""
    # min_points_per_centroid=1 silences faiss's "please provide at least 39k points"
    # warning, which is expected here: classes are small by nature.
    kmeans = faiss.Kmeans(x.shape[1], count, niter=niter, seed=seed, verbose=False,
                          min_points_per_centroid=1)
    kmeans.train(x)
    members = faiss.IndexFlatL2(x.shape[1])
    members.add(x)
    _, nearest = members.search(kmeans.centroids, 1)
    return np.unique(nearest[:, 0])


def hart_condense(profiles: torch.Tensor, labels: torch.Tensor, seed: int = 0, batch: int = 256) -> torch.Tensor:
    """Hart's condensed nearest neighbour (1968), vectorised over blocks of candidates.

    Start with one random sample per class; visit the rest in a random order in blocks of
    ``batch``, classify the whole block by 1-NN against the current store (one matrix
    product) and add its misclassified samples; repeat passes until a pass adds nothing.
    Then 1-NN on the kept set classifies every training profile correctly (the invariant
    of Hart's rule; ties aside). Block-wise adding keeps slightly more than the strictly
    sequential rule would, in exchange for one matmul per block. Returns sorted (M,).
    """
    check(batch >= 1, f"cnn batch={batch} must be at least 1")
    x = profiles.detach().to("cpu", torch.float32)  # a one-off selection: CPU is fine
    y = labels.to("cpu", torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    in_store = torch.zeros(len(y), dtype=torch.bool)
    # the first sample of each class in the random order seeds the store
    first_seen = torch.full((int(y.max()) + 1,), len(y), dtype=torch.long)
    first_seen.scatter_reduce_(0, y[order], torch.arange(len(y)), reduce="amin")
    in_store[order[first_seen[first_seen < len(y)]]] = True
    changed = True
    while changed:
        changed = False
        for start in range(0, len(order), batch):
            block = order[start:start + batch]
            block = block[~in_store[block]]
            if len(block) == 0:
                continue
            store = torch.nonzero(in_store).squeeze(1)
            sq = torch.cdist(x[block], x[store]).square()
            wrong = y[store[sq.argmin(dim=1)]] != y[block]
            if wrong.any():
                in_store[block[wrong]] = True
                changed = True
    return torch.nonzero(in_store).squeeze(1)


# ---------------------------------------------------------------- ivfpq
def ivfpq_layout(num_items: int, dim: int, nlist: Optional[int] = None, m: Optional[int] = None,
                 nbits: int = 8) -> dict:
    """Choose IVF-PQ sizes: nlist ~ sqrt(N) (at most N/39 and 4096), m sub-quantizers
    of about 8 dims each (at most 64), and the padded dim (a multiple of m)."""
    check(1 <= nbits <= 16, f"ivfpq nbits={nbits} must be in 1..16; 8 is the usual choice")
    min_items = 4 * 2 ** nbits
    check(num_items >= min_items,
          f"memory='ivfpq' needs at least {min_items} stored profiles to train its {2 ** nbits}-entry "
          f"codebooks (got {num_items}); use memory='full' or 'condensed' for small training sets, or lower nbits")
    if nlist is None:
        nlist = int(round(math.sqrt(num_items)))
        nlist = max(1, min(nlist, num_items // 39, 4096))
    check(1 <= nlist <= num_items,
          f"ivfpq nlist={nlist} must be between 1 and the {num_items} stored profiles; omit it for ~sqrt(N)")
    if m is None:
        m = max(1, min(64, math.ceil(dim / 8)))
    check(1 <= m <= dim, f"ivfpq m={m} sub-quantizers must be between 1 and the profile size {dim}")
    padded = math.ceil(dim / m) * m
    return {"nlist": nlist, "m": m, "nbits": nbits, "padded_dim": padded}


def build_ivfpq(profiles: torch.Tensor, nlist: Optional[int] = None, m: Optional[int] = None,
                nbits: int = 8, seed: int = 0) -> faiss.Index:
    """Train an IVF-PQ index on ``profiles`` (N, P) and add them (ids 0..N-1).

    When m does not divide P the profiles are zero-padded to a multiple of m inside the
    index (``RemapDimensionsTransform``), so P = 202 or 195 still gets ~8-dim sub-vectors.
    """
    x = _as_numpy(profiles)
    num_items, dim = x.shape
    layout = ivfpq_layout(num_items, dim, nlist=nlist, m=m, nbits=nbits)
    padded = layout["padded_dim"]
    coarse = faiss.IndexFlatL2(padded)
    ivf = faiss.IndexIVFPQ(coarse, padded, layout["nlist"], layout["m"], nbits)
    # small memories are expected: do not warn about "39 points per centroid"
    ivf.cp.min_points_per_centroid = 1
    ivf.cp.seed = seed
    ivf.pq.cp.min_points_per_centroid = 1
    ivf.pq.cp.seed = seed
    index: faiss.Index = ivf
    if padded != dim:
        # faiss's python layer keeps the transform and the inner index alive with the wrapper
        index = faiss.IndexPreTransform(faiss.RemapDimensionsTransform(dim, padded, False), ivf)
    index.train(x)
    index.add(x)
    return index


def serialize_index(index: faiss.Index) -> torch.Tensor:
    """faiss index -> uint8 tensor (bytes), for a registered buffer."""
    return torch.from_numpy(faiss.serialize_index(index).copy())


def deserialize_index(data: torch.Tensor, nprobe: int) -> faiss.Index:
    """uint8 tensor -> faiss index, with ``nprobe`` lists probed and a direct map for reconstruct."""
    index = faiss.deserialize_index(np.ascontiguousarray(data.cpu().numpy()))
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = max(1, min(int(nprobe), ivf.nlist))
    ivf.make_direct_map()
    return index


def _as_numpy(profiles: torch.Tensor) -> np.ndarray:
    """(N, P) float32 C-contiguous numpy view (no copy for CPU float32 contiguous tensors)."""
    return np.ascontiguousarray(profiles.detach().to("cpu", torch.float32).numpy())
