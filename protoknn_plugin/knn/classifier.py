"""``KNNClassifier``: the memory bank, searched by a registered backend, then the vote."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import check
from .backends import check_backend, create_knn_backend, resolve_backend
from .bank import MemoryBank, check_memory, check_profiles
from .vote import MajorityVote


class KNNClassifier(MemoryBank):
    """kNN over stored prototype profiles, majority vote, squared L2.

    The bank (its buffers, saving and loading) is ``MemoryBank``'s; this class adds the search,
    by the backend ``backend`` names (``knn.backends``), and the vote (``vote_rule``, by default
    ``MajorityVote``). Search results index the memory bank (0..N-1); ``memory_index[idx]`` maps
    them back to the training set.
    """

    vote_rule = MajorityVote

    def __init__(self, k: int = 5, ks: Sequence[int] = (1, 3, 5, 10), memory: str = "full",
                 num_classes: Optional[int] = None, backend: str = "auto", **memory_options):
        check_memory(memory, {})
        check_backend(backend)
        check(not (memory == "ivfpq" and backend == "torch"),
              "backend='torch' cannot search an ivfpq memory (it holds PQ codes, not profiles); "
              "use backend='auto' or 'faiss', or memory='full'")
        check_memory(memory, memory_options)
        k = check_k(k, "k")
        ks = tuple(check_k(value, "ks") for value in ks)
        check(len(ks) > 0, "ks is empty; pass e.g. ks=(1, 3, 5, 10)")
        super().__init__(memory, num_classes, **memory_options)
        self.k, self.ks, self.backend = k, ks, backend

    def extra_repr(self) -> str:
        return (f"k={self.k}, ks={self.ks}, memory={self.memory!r}, backend={self.backend!r}, "
                f"items={len(self)}, dim={self.dim}")

    # ------------------------------------------------------------ search
    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """k nearest memory items: squared L2 ``dist`` (Q, k) ascending and memory ``idx`` (Q, k)."""
        queries = self._check_queries(queries)
        self._check_k_fits(k)
        return self._backend_for(queries).search(self, queries, k)

    def _backend_for(self, queries: torch.Tensor):
        return create_knn_backend(resolve_backend(self.backend, self.memory, queries))

    # ------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, queries: torch.Tensor) -> torch.Tensor:
        """Majority vote at ``self.k``: (Q, P) -> (Q,) class indices."""
        return self.predict_many(queries, ks=(self.k,))[self.k]

    @torch.no_grad()
    def predict_many(self, queries: torch.Tensor, ks: Optional[Iterable[int]] = None) -> Dict[int, torch.Tensor]:
        """Predictions for every k in ``ks`` (default ``self.ks``) from ONE search at max(ks)."""
        ks = tuple(check_k(value, "ks") for value in (self.ks if ks is None else ks))
        check(len(ks) > 0, "predict_many got an empty ks; pass e.g. ks=(1, 3, 5, 10)")
        queries = self._check_queries(queries)
        self._check_k_fits(max(ks))
        _, idx = self._backend_for(queries).search(self, queries, max(ks))
        labels = self.memory_labels.to(idx.device)[idx]
        return self.vote_rule(self.fitted_num_classes).for_each_k(labels, ks)

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
        backend = self._backend_for(queries)
        for value in classes.unique().tolist():
            members = torch.nonzero(labels == value).squeeze(1)
            check(len(members) > 0,
                  f"class {value} has no item in the kNN memory (classes stored: {class_summary(labels)}); "
                  f"pick a stored class, or use memory='full' so every training class is kept")
            rows = torch.nonzero(classes == value).squeeze(1).to(queries.device)
            subset = self.profiles_of(members).to(queries.device)
            class_dist, class_pos = backend.search_items(queries[rows], subset, 1)
            dist[rows] = class_dist[:, 0]
            idx[rows] = members.to(queries.device)[class_pos[:, 0]]
        return dist, idx

    # ------------------------------------------------------------ validation
    def _check_queries(self, queries: torch.Tensor) -> torch.Tensor:
        self.check_fitted("searching")
        queries = check_profiles(queries, "queries")
        check(queries.shape[1] == self.dim,
              f"queries have {queries.shape[1]} prototype scores per row but the kNN memory stores {self.dim}; "
              f"use profiles from the model whose training profiles were stored")
        return queries

    def _check_k_fits(self, k: int) -> None:
        check_k(k, "k")
        check(k <= len(self),
              f"k={k} is larger than the {len(self)} stored training profiles; lower k or store more profiles"
              + (" (memory='full' keeps every training profile)" if self.memory == "condensed" else ""))


def check_k(k, name: str) -> int:
    check(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1,
          f"{name}={k!r} is not a valid number of neighbours; pass a positive integer")
    return int(k)


def class_summary(labels: torch.Tensor) -> str:
    classes = labels.unique().tolist()
    shown = ", ".join(str(c) for c in classes[:10])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
