import math

import pytest
import torch
import torch.nn.functional as F

from protoknn_plugin.errors import ProtoKNNError, UnknownNameError
from protoknn_plugin.prototypes import PrototypeLayer, hypersphere_init, project, prototype_spread


def test_hypersphere_init_beats_random_unit_vectors():
    protos = hypersphere_init(202, 256)
    assert protos.shape == (202, 256)
    assert torch.allclose(protos.norm(dim=1), torch.ones(202), atol=1e-5)
    random = F.normalize(torch.randn(202, 256, generator=torch.Generator().manual_seed(1)), dim=1)
    assert prototype_spread(protos) > prototype_spread(random)
    # The optimised quantity itself: the largest cosine to another prototype is smaller.
    def worst(p):
        cos = p @ p.t() - 2 * torch.eye(len(p))
        return cos.max().item()
    assert worst(protos) < worst(random)


def test_prototype_spread_hand_cases():
    same = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert prototype_spread(same) == pytest.approx(0.0, abs=1e-7)
    opposite = torch.tensor([[1.0, 0.0], [-3.0, 0.0]])
    assert prototype_spread(opposite) == pytest.approx(1.0)
    orthogonal = torch.eye(2)
    assert prototype_spread(orthogonal) == pytest.approx(1 - math.sqrt(0.5))


def _layer_with_identity_addon(P=3, D=2, **kw):
    layer = PrototypeLayer(D, P, D, **kw)
    with torch.no_grad():
        layer.addon.weight.copy_(torch.eye(D).view(D, D, 1, 1))
        layer.addon.bias.zero_()
    return layer


def test_cosine_profile_cost_and_gap_cost_hand_computed():
    layer = _layer_with_identity_addon(P=2, D=2, init="random")
    with torch.no_grad():
        layer.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # two patches: (2, 0) and (1, 1)/sqrt2 direction
    fmap = torch.tensor([[2.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    out = layer(fmap, maps=True)
    c = 1 / math.sqrt(2)
    # prototype 0: cos 1 (patch 0) and c (patch 1); prototype 1: cos 0 and c
    assert torch.allclose(out.profile, torch.tensor([[1.0, c]]), atol=1e-6)
    assert out.locations.tolist() == [[0, 1]]
    dist = torch.tensor([[0.0, 2 - 2 * c], [2.0, 2 - 2 * c]])  # 2 - 2 cos on the unit sphere
    assert torch.allclose(out.cost, dist.min(1).values[None], atol=1e-6)
    assert torch.allclose(out.gap_cost, (dist.min(1).values - dist.mean(1))[None], atol=1e-6)
    assert out.similarity_maps.shape == (1, 2, 1, 2)


def test_raw_cost_space_uses_unnormalised_patches():
    layer = _layer_with_identity_addon(P=1, D=2, init="random", cost_space="raw")
    with torch.no_grad():
        layer.prototypes.copy_(torch.tensor([[1.0, 0.0]]))
    fmap = torch.tensor([[3.0], [4.0]]).view(1, 2, 1, 1)
    out = layer(fmap)
    assert out.cost.item() == pytest.approx((3 - 1) ** 2 + 4 ** 2)


def test_log_similarity_mode_matches_protopnet_formula():
    layer = PrototypeLayer(2, 1, 2, similarity="log", addon="linear", init="random")
    with torch.no_grad():
        layer.addon.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        layer.addon.bias.zero_()
        layer.prototypes.copy_(torch.tensor([[1.0, 1.0]]))
    fmap = torch.tensor([[1.0, 3.0], [1.0, 1.0]]).view(1, 2, 1, 2)
    out = layer(fmap)
    d = 0.0  # patch 0 equals the prototype
    assert out.cost.item() == pytest.approx(d)
    assert out.profile.item() == pytest.approx(math.log((d + 1) / (d + 1e-4)), rel=1e-5)


def test_frozen_prototypes_get_no_gradient():
    layer = PrototypeLayer(4, 5, 3)
    assert not layer.prototypes.requires_grad
    out = layer(torch.randn(2, 4, 3, 3))
    out.profile.sum().backward()
    assert layer.prototypes.grad is None
    layer.freeze(False)
    assert layer.prototypes.requires_grad


def test_project_moves_each_prototype_onto_its_most_similar_patch():
    torch.manual_seed(0)
    layer = PrototypeLayer(3, 4, 3)
    feats = torch.randn(5, 3, 2, 2)
    before = F.normalize(layer.prototypes.detach().clone(), dim=1)
    record = project(layer, [(feats[:3], torch.zeros(3, dtype=torch.long), torch.arange(3)),
                             (feats[3:], torch.ones(2, dtype=torch.long), torch.arange(3, 5))])
    z = F.normalize(layer.addon(feats).detach().flatten(2), dim=1)  # (5, 3, 4)
    cos = torch.einsum("bdn,pd->pbn", z, before).reshape(4, -1)
    best = cos.argmax(dim=1)
    assert record.image_index.tolist() == (best // 4).tolist()
    assert record.location.tolist() == (best % 4).tolist()
    expected = z.permute(0, 2, 1).reshape(-1, 3)[best]
    assert torch.allclose(layer.prototypes, expected, atol=1e-6)
    assert record.map_size == (2, 2)
    # how far each prototype moved: its cosine to the chosen patch, the best cosine it had
    assert torch.allclose(record.cosine, cos.max(dim=1).values, atol=1e-6)


def test_projection_summary_counts_distinct_images_and_patches_by_hand():
    from protoknn_plugin.prototypes import ProjectionRecord, projection_summary

    # Four prototypes: two share image 7's patch 3, one sits on image 7's patch 0, one on image 2.
    record = ProjectionRecord(torch.tensor([7, 7, 7, 2]), torch.tensor([3, 3, 0, 3]), torch.zeros(4), (2, 2),
                              torch.tensor([1.0, 0.5, 0.0, -0.5]))
    assert projection_summary(record) == {"prototypes": 4, "distinct_images": 2, "distinct_patches": 3,
                                          "cosine_mean": 0.25, "cosine_min": -0.5}


def test_log_similarity_projection_measures_the_cosine_too():
    torch.manual_seed(0)
    layer = PrototypeLayer(3, 2, 3, similarity="log", addon="linear", init="uniform", frozen=False)
    before = layer.prototypes.detach().clone()
    feats = torch.randn(4, 3, 2, 2)
    record = project(layer, [(feats, torch.zeros(4, dtype=torch.long), torch.arange(4))])
    patches = layer.prototypes.detach()  # ProtoPNet's prototypes become the raw patches
    assert torch.allclose(record.cosine, F.cosine_similarity(before, patches, dim=1), atol=1e-6)


def test_project_within_class_only_searches_that_class():
    torch.manual_seed(0)
    layer = PrototypeLayer(3, 2, 3, similarity="log", addon="linear", init="uniform", frozen=False)
    feats = torch.randn(4, 3, 2, 2)
    labels = torch.tensor([0, 0, 1, 1])
    record = project(layer, [(feats, labels, torch.arange(4))], prototype_class=torch.tensor([1, 0]))
    assert set(record.image_index.tolist()[:1]) <= {2, 3}
    assert set(record.image_index.tolist()[1:]) <= {0, 1}


def test_project_without_a_patch_of_the_class_is_a_clear_error():
    layer = PrototypeLayer(3, 1, 3)
    with pytest.raises(ProtoKNNError, match="no training patch"):
        project(layer, [(torch.randn(2, 3, 2, 2), torch.zeros(2, dtype=torch.long), torch.arange(2))],
                prototype_class=torch.tensor([7]))


def test_unknown_modes_name_the_choices():
    with pytest.raises(UnknownNameError, match="cosine"):
        PrototypeLayer(3, 2, 3, similarity="cosin")
    with pytest.raises(UnknownNameError, match="shifted-normal"):
        PrototypeLayer(3, 2, 3, init="gaussian")


def test_protopnet_prototype_inits_reference_uniform_and_cabrnets_shifted_normal_by_default():
    from protoknn_plugin.heads import create_head
    from protoknn_plugin.model import ModelConfig, PrototypeModel

    def prototypes(**options):
        config = ModelConfig(head="protopnet", backbone="small-cnn", num_classes=10, in_channels=1, dim=64,
                             num_prototypes=1000, head_options=options, backbone_options={"width": 8})
        return PrototypeModel(config).prototype_layer.prototypes.detach()

    uniform, normal = prototypes(prototype_init="uniform"), prototypes()  # the default is CaBRNet's
    # U[0, 1]: mean 1/2, std 1/sqrt(12) = 0.289, inside [0, 1]; N(0.5, 0.1): mean 1/2, std 0.1.
    assert uniform.min() >= 0 and uniform.max() <= 1
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.std() - 12 ** -0.5) < 0.01
    assert abs(normal.mean() - 0.5) < 0.01 and abs(normal.std() - 0.1) < 0.005
    with pytest.raises(UnknownNameError, match="shifted-normal"):
        create_head("protopnet", num_classes=10, backbone_channels=8, prototype_init="normal")
