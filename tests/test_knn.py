"""KNNClassifier: exact search, majority vote with ProtoKNN's tie rule, state, compact memories."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from protoknn_plugin.errors import ProtoKNNError, UnknownNameError
from protoknn_plugin.knn import MEMORY_KINDS, KNNClassifier, majority_vote, torch_knn_search

BACKENDS = ("faiss", "torch")


def random_data(n=300, p=24, classes=5, queries=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    q = torch.randn(queries, p, generator=g)
    return x, y, q


def clusters(n_per_class, classes, p, spread=0.3, seed=0):
    """Well-separated Gaussian clusters: centres 10 apart in a random direction each."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, p, generator=g) * 10
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), p, generator=g)
    return x, y


def reference_predict(x, y, q, k):
    """Brute force: torch.cdist, stable sort, Python-loop vote, closest tied class wins."""
    order = torch.cdist(q.double(), x.double()).argsort(dim=1, stable=True)[:, :k]
    preds = []
    for row in order.tolist():
        votes, first = {}, {}
        for rank, item in enumerate(row):
            c = int(y[item])
            votes[c] = votes.get(c, 0) + 1
            first.setdefault(c, rank)
        best = max(votes.values())
        preds.append(min((first[c], c) for c in votes if votes[c] == best)[1])
    return torch.tensor(preds)


def line_memory(labels):
    """Memory items at 1, 2, 3, ... on the x axis with the given labels; query at 0.

    So the i-th nearest neighbour of the query is item i, at squared distance (i + 1)^2."""
    n = len(labels)
    x = torch.zeros(n, 2)
    x[:, 0] = torch.arange(1, n + 1, dtype=torch.float32)
    return x, torch.tensor(labels), torch.zeros(1, 2)


# ---------------------------------------------------------------- exact search and vote
@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_brute_force_reference(backend):
    x, y, q = random_data()
    knn = KNNClassifier(backend=backend).fit(x, y)
    sq = torch.cdist(q.double(), x.double()).square()
    ref_dist, ref_idx = sq.sort(dim=1)
    dist, idx = knn.search(q, 10)
    assert torch.equal(idx, ref_idx[:, :10])
    torch.testing.assert_close(dist.double(), ref_dist[:, :10], rtol=1e-4, atol=1e-4)
    for k in (1, 3, 5, 10):
        knn.k = k
        assert torch.equal(knn.predict(q), reference_predict(x, y, q, k)), k


def test_torch_search_chunks_agree_with_one_block():
    x, _, q = random_data(n=257, queries=37)
    whole = torch_knn_search(q, x, 7)
    # tiny blocks force several query chunks and several memory chunks (with a ragged last one)
    chunked = torch_knn_search(q, x, 7, block_elements=5 * 64, query_chunk=5)
    assert torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(whole[0], chunked[0])
    # memory chunk 300 // 1 rounds down to 256 (aligned GEMM): chunks 256 + 1 of 257 items
    aligned = torch_knn_search(q, x, 7, block_elements=300, query_chunk=1)
    assert torch.equal(whole[1], aligned[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_returns_squared_distances(backend):
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    knn = KNNClassifier(backend=backend).fit(x, torch.tensor([0, 1, 1]))
    dist, idx = knn.search(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), 3)
    # squared: 25 and 100, not the distances 5 and 10
    torch.testing.assert_close(dist, torch.tensor([[0.0, 25.0, 100.0], [0.0, 25.0, 25.0]]))
    assert idx[0].tolist() == [0, 1, 2] and idx[1, 0] == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labels, k, expected", [
    ([0, 1], 2, 0),              # 1-1 tie: the class of the nearest wins
    ([1, 0], 2, 1),              # same, with classes swapped: not "the lowest class index"
    ([1, 0, 0, 1], 4, 1),        # 2-2 tie, class 1 has the nearest member
    ([0, 1, 1, 0], 4, 0),
    ([2, 0, 1], 3, 2),           # 3-way tie 1-1-1
    ([1, 2, 0, 0, 2, 1], 6, 1),  # 3-way tie 2-2-2
    ([0, 1, 1], 3, 1),           # a real majority beats the nearest neighbour
    ([0, 1, 1, 2, 2, 2], 6, 2),
])
def test_ties_go_to_the_class_with_the_closest_member(backend, labels, k, expected):
    x, y, q = line_memory(labels)
    knn = KNNClassifier(k=k, backend=backend, num_classes=3).fit(x, y)
    assert knn.predict(q).tolist() == [expected]


def test_majority_vote_is_vectorised_over_queries():
    neighbours = torch.tensor([[0, 1, 1, 0], [3, 2, 2, 3], [1, 1, 0, 0], [2, 2, 2, 1]])
    assert majority_vote(neighbours, 4).tolist() == [0, 3, 1, 2]
    assert majority_vote(neighbours[:, :1], 4).tolist() == [0, 3, 1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_many_equals_separate_predicts(backend):
    x, y, q = random_data(seed=1)
    knn = KNNClassifier(backend=backend).fit(x, y)
    many = knn.predict_many(q)
    assert sorted(many) == [1, 3, 5, 10]
    for k, pred in many.items():
        assert torch.equal(pred, KNNClassifier(k=k, backend=backend).fit(x, y).predict(q))
    assert torch.equal(knn.predict_many(q, ks=[2])[2], KNNClassifier(k=2).fit(x, y).predict(q))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_of_class_matches_brute_force(backend):
    x, y, q = random_data(seed=2)
    knn = KNNClassifier(backend=backend).fit(x, y)
    sq = torch.cdist(q.double(), x.double()).square()
    dist, idx = knn.nearest_of_class(q, 3)
    masked = sq.masked_fill(y != 3, float("inf"))
    assert torch.equal(idx, masked.argmin(dim=1))
    torch.testing.assert_close(dist.double(), masked.min(dim=1).values, rtol=1e-4, atol=1e-4)
    # one class per query
    classes = torch.arange(len(q)) % 5
    dist, idx = knn.nearest_of_class(q, classes)
    masked = sq.masked_fill(y.unsqueeze(0) != classes.unsqueeze(1), float("inf"))
    assert torch.equal(idx, masked.argmin(dim=1))
    assert torch.equal(y[idx], classes)


# ---------------------------------------------------------------- state
def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("memory, options", [
    ("full", {}), ("condensed", {"fraction": 0.2}), ("ivfpq", {"nprobe": 4})])
def test_state_dict_roundtrip_into_empty_classifier(memory, options):
    x, y = clusters(400, 3, 16, spread=2.0)
    q, _ = clusters(20, 3, 16, spread=2.0, seed=5)
    knn = KNNClassifier(k=3, memory=memory, **options).fit(x, y)
    fresh = KNNClassifier(k=3)  # default memory='full', nothing stored
    fresh.load_state_dict(roundtrip(knn.state_dict()))
    assert fresh.memory == memory and len(fresh) == len(knn)
    assert torch.equal(fresh.memory_index, knn.memory_index)
    assert torch.equal(fresh.predict(q), knn.predict(q))
    assert torch.equal(fresh.search(q, 5)[1], knn.search(q, 5)[1])


def test_state_dict_resizes_a_fitted_classifier_and_works_nested():
    x, y, q = random_data()
    small = KNNClassifier(k=1).fit(x[:50], y[:50])
    big = KNNClassifier(k=1).fit(x, y)
    small.load_state(roundtrip(big.state_dict_extra()))
    assert len(small) == 300 and torch.equal(small.predict(q), big.predict(q))
    parent, other = nn.Sequential(nn.Linear(2, 2), big), nn.Sequential(nn.Linear(2, 2), KNNClassifier(k=1))
    other.load_state_dict(parent.state_dict())
    assert torch.equal(other[1].predict(q), big.predict(q))


# ---------------------------------------------------------------- errors
def one_line_error(call, *words):
    with pytest.raises(ProtoKNNError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_errors_are_one_line_and_name_the_problem():
    x, y, q = random_data(n=40, p=8, queries=3)
    knn = KNNClassifier(k=5).fit(x, y)
    one_line_error(lambda: KNNClassifier().predict(q), "empty", "fit")
    one_line_error(lambda: KNNClassifier(k=50).fit(x, y).predict(q), "k=50", "40 stored", "lower k")
    one_line_error(lambda: knn.predict_many(q, ks=(1, 41)), "k=41")
    one_line_error(lambda: knn.predict(torch.randn(3, 9)), "9", "8")
    bad = x.clone()
    bad[3, 2] = float("nan")
    one_line_error(lambda: KNNClassifier().fit(bad, y), "non-finite")
    one_line_error(lambda: knn.predict(bad[:5]), "non-finite")
    one_line_error(lambda: knn.search(torch.full((2, 8), float("inf")), 1), "non-finite")
    huge = torch.full((4, 2), 3e38)  # finite, though their sum overflows: still accepted
    assert len(KNNClassifier(k=1).fit(huge, torch.arange(4))) == 4
    one_line_error(lambda: KNNClassifier().fit(torch.empty(0, 8), torch.empty(0, dtype=torch.long)), "empty")
    one_line_error(lambda: knn.nearest_of_class(q, 7), "class 7")
    one_line_error(lambda: KNNClassifier().fit(x, y[:-1]), "labels")
    one_line_error(lambda: KNNClassifier().fit(x, y.float()), "integer")
    one_line_error(lambda: KNNClassifier(num_classes=2).fit(x, y), "num_classes")
    one_line_error(lambda: KNNClassifier(k=0), "k")
    one_line_error(lambda: knn.predict(q[0]), "unsqueeze")
    one_line_error(lambda: KNNClassifier(memory="condensed", fractoin=0.1), "fraction")
    one_line_error(lambda: KNNClassifier(memory="ivfpq").fit(x, y), "ivfpq", "1024")
    one_line_error(lambda: KNNClassifier(memory="ivfpq", backend="torch"), "ivfpq")
    with pytest.raises(UnknownNameError, match="condensed"):
        KNNClassifier(memory="condenced")
    with pytest.raises(UnknownNameError):
        KNNClassifier(backend="cuda")


# ---------------------------------------------------------------- compact memories
def test_memory_kinds():
    assert MEMORY_KINDS == ("full", "condensed", "ivfpq")
    x, y, _ = random_data(n=30)
    knn = KNNClassifier().fit(x, y)
    assert torch.equal(knn.memory_index, torch.arange(30)) and torch.equal(knn.memory_profiles, x)
    assert knn.memory_bytes() == 30 * 24 * 4 + 2 * 30 * 8


def test_condensed_kmeans_keeps_real_samples_and_at_most_the_fraction():
    x, y = clusters(60, 4, 12, spread=2.0)
    keep = torch.cat([torch.arange(0, 60), torch.arange(60, 90), torch.arange(120, 240)])
    x, y = x[keep], y[keep]  # class sizes 60, 30, 60, 60
    knn = KNNClassifier(k=1, memory="condensed", fraction=0.1).fit(x, y)
    counts = torch.bincount(knn.memory_labels, minlength=4)
    assert (counts >= 1).all() and (counts <= torch.tensor([6, 3, 6, 6])).all()
    assert len(knn) < len(y)
    # each kept item is a real training sample with its original index and label
    assert torch.equal(knn.memory_profiles, x[knn.memory_index])
    assert torch.equal(knn.memory_labels, y[knn.memory_index])
    assert knn.memory_bytes() < KNNClassifier().fit(x, y).memory_bytes()
    fixed = KNNClassifier(k=1, memory="condensed", per_class=2).fit(x, y)
    assert (torch.bincount(fixed.memory_labels) <= 2).all()
    assert (fixed.predict(x) == y).float().mean() > 0.95  # clusters are separable


def test_condensed_cnn_classifies_every_training_sample():
    x, y = clusters(80, 3, 6, spread=4.0, seed=3)
    knn = KNNClassifier(k=1, memory="condensed", method="cnn", batch=16).fit(x, y)
    assert len(knn) < len(y)
    assert torch.equal(knn.memory_profiles, x[knn.memory_index])
    # Hart's invariant: 1-NN on the kept set labels the whole training set correctly
    assert torch.equal(knn.predict(x), y)


@pytest.mark.parametrize("dim", [32, 20])  # 20: m = 3 does not divide P, padded inside the index
def test_ivfpq_on_separated_clusters(dim):
    x, y = clusters(1000, 4, dim, spread=1.0)
    # held-out queries: fresh noise around the same cluster centres
    g = torch.Generator().manual_seed(7)
    q, q_labels = x[::9] + torch.randn(len(x[::9]), dim, generator=g), y[::9]
    knn = KNNClassifier(k=5, memory="ivfpq").fit(x, y)
    assert len(knn) == 4000 and knn.memory_profiles.numel() == 0
    assert knn.memory_bytes() < 0.5 * KNNClassifier().fit(x, y).memory_bytes()
    assert (knn.predict(q) == q_labels).float().mean() > 0.95
    dist, idx = knn.search(x[:10], 5)
    assert (dist[:, 1:] >= dist[:, :-1]).all() and (idx >= 0).all()
    rebuilt = knn.profiles_of(torch.arange(10))
    assert rebuilt.shape == (10, dim)
    assert (rebuilt - x[:10]).norm(dim=1).mean() < 0.5 * x[:10].norm(dim=1).mean()
    _, neg = knn.nearest_of_class(x[:10], 2)
    assert (knn.memory_labels[neg] == 2).all()
