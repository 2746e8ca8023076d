"""The kNN classifier's parts: registered search backends and the vote for several k."""
from __future__ import annotations

import torch

from protoknn_plugin.knn import KNNClassifier, MajorityVote, backends
from protoknn_plugin.registry import Registry


def test_users_choose_auto_faiss_or_torch_and_the_rest_is_picked_for_them():
    assert backends.selectable_backends() == ("auto", "faiss", "torch")
    assert set(backends.list_knn_backends()) == {"faiss", "faiss-gpu", "ivfpq", "torch"}
    cpu = torch.zeros(1, 2)
    assert backends.resolve_backend("torch", "full", cpu) == "torch"
    assert backends.resolve_backend("torch", "ivfpq", cpu) == "ivfpq"  # PQ codes only the index can search


def test_a_backend_registered_outside_searches_and_its_neighbours_are_voted(monkeypatch):
    registry = Registry("kNN backend")
    for name in backends.list_knn_backends():
        registry.register(name)(backends.KNN_BACKENDS.get(name))
    monkeypatch.setattr(backends, "KNN_BACKENDS", registry)

    @registry.register("reversed")
    class Reversed(backends.KNNBackend):
        """The k FARTHEST items: proves that the classifier searches with the chosen backend."""

        def search(self, bank, queries, k):
            dist = torch.cdist(queries, bank.memory_profiles).square()
            return dist.topk(k, dim=1, largest=True)

    # items at 1, 2, 3, 4 on a line, labels 0, 0, 1, 1; query at 0: nearest is class 0, farthest class 1
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    q = torch.zeros(1, 2)
    assert "reversed" in backends.selectable_backends()
    assert KNNClassifier(k=1, backend="reversed").fit(x, y).predict(q).tolist() == [1]
    assert KNNClassifier(k=1, backend="faiss").fit(x, y).predict(q).tolist() == [0]


def test_one_neighbour_list_is_voted_for_every_k():
    # neighbours nearest first: k=1 -> 2; k=3 -> 0 (two votes); k=4 -> 2-2 tie, 2 is nearer
    votes = MajorityVote(3).for_each_k(torch.tensor([[2, 0, 0, 2]]), (1, 3, 4))
    assert {k: v.tolist() for k, v in votes.items()} == {1: [2], 3: [0], 4: [2]}
