"""The paper's comparison heads (TesNet, cosine ProtoPNet): each loss hand-computed on tiny
tensors, their similarity and push, their schedules, and one tiny CLI chain per head."""
import csv
import json
import math

import pytest
import torch

from protoknn_plugin.checkpoint import load_checkpoint
from protoknn_plugin.errors import ProtoKNNError, UnknownNameError
from protoknn_plugin.explain import part_box
from protoknn_plugin.deformable import DeformablePrototypeLayer, part_grid, sample_parts
from protoknn_plugin.heads import create_head, list_heads
from protoknn_plugin.heads.deformable_protopnet import (DeformableProtoPNetHead, angular_margin,
                                                        part_orthogonality)
from protoknn_plugin.heads.options import parse_rows
from protoknn_plugin.heads.protopool import (ProtoPoolHead, focal_slot_similarity, gumbel_scale, pool_distance_loss,
                                             slot_distributions, slot_orthogonality)
from protoknn_plugin.heads.tesnet import (TesNetHead, class_bases, orthonormality_loss,
                                          subspace_separation_loss)
from protoknn_plugin.prototypes import PrototypeLayer, PrototypeOutputs, project

from conftest import TINY, run_cli, run_cli_parallel

torch.set_num_threads(1)


# --------------------------------------------------------------------------- TesNet's losses

def test_orthonormality_is_the_entrywise_l1_of_gram_minus_identity():
    # b1 = e1, b2 at 60 degrees: B B^T = [[1, .5], [.5, 1]], so |B B^T - I| sums to 0.5 + 0.5.
    raw = torch.tensor([[2.0, 0.0], [0.5, math.sqrt(3) / 2]])  # lengths 2 and 1: only directions count
    bases = class_bases(raw, num_classes=1)
    assert orthonormality_loss(bases).item() == pytest.approx(1.0)
    # Two classes, each orthonormal: nothing to pay.
    assert orthonormality_loss(class_bases(torch.eye(4), num_classes=2)).item() == pytest.approx(0.0, abs=1e-7)


def test_subspace_separation_is_the_projection_metric():
    # Lines e1 and e2: P_0 - P_1 = diag(1, -1), Frobenius sqrt(2), times 1/sqrt(2) -> 1.
    assert subspace_separation_loss(class_bases(torch.eye(2), 2)).item() == pytest.approx(1.0)
    # One plane spanned twice (e1, e2 and the diagonals): the same subspace, distance 0.
    diagonals = torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2)
    same = class_bases(torch.cat([torch.eye(2), diagonals]), 2)
    assert subspace_separation_loss(same).item() == pytest.approx(0.0, abs=1e-5)


def test_subspace_separation_matches_the_d_by_d_projections_for_three_classes():
    gen = torch.Generator().manual_seed(0)
    bases = class_bases(torch.randn(6, 5, generator=gen, dtype=torch.float64), 3)  # 3 classes, 2 vectors, D = 5
    projections = [b.t() @ b for b in bases]
    expected = sum(torch.linalg.norm(projections[c] - projections[k]) for c in range(3) for k in range(c + 1, 3))
    assert subspace_separation_loss(bases).item() == pytest.approx(expected.item() / math.sqrt(2), rel=1e-9)


def test_tesnet_loss_terms_hand_computed():
    head = TesNetHead(num_classes=2, backbone_channels=4, dim=2, prototypes_per_class=1)
    # best-patch cosines: image 0 (class 0): own 0.5, other 0.0; image 1 (class 1): own 1.0, other -0.5
    cosine = torch.tensor([[0.5, 0.0], [-0.5, 1.0]])
    prototypes = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # orthogonal: L_orth 0, L_ss 1
    out = PrototypeOutputs(torch.zeros(2, 2), 2 - 2 * cosine, None, None, None, torch.zeros(2, 4, 1, 1),
                           prototypes=prototypes)
    terms = head.loss(out, torch.tensor([0, 1]))
    assert terms["cluster"].item() == pytest.approx(-(0.5 + 1.0) / 2)
    assert terms["separation"].item() == pytest.approx(-(0.0 - 0.5) / 2)
    assert terms["orthonormality"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["subspace_separation"].item() == pytest.approx(1.0)
    assert terms["l1"].item() == pytest.approx(1.0)  # two off-class weights of -0.5
    assert terms["ce"].item() == pytest.approx(math.log(2))  # zero profiles: equal logits
    expected = math.log(2) + 0.8 * -0.75 - 0.08 * 0.25 + 1e-4 * 0.0 - 1e-7 * 1.0 + 1e-4 * 1.0
    assert terms["total"].item() == pytest.approx(expected)


def test_tesnet_projection_similarity_and_push_keep_the_feature_unnormalised():
    layer = PrototypeLayer(2, 1, 2, similarity="projection", addon="linear", init="uniform", frozen=False)
    with torch.no_grad():
        layer.addon.weight.copy_(torch.eye(2)[:, :, None, None])
        layer.addon.bias.zero_()
        layer.prototypes.copy_(torch.tensor([[2.0, 0.0]]))
    # patch 0 = (1, 0): cos 1, projection 1; patch 1 = (3, 4): cos 0.6, projection 3.
    features = torch.tensor([[[[1.0, 3.0]], [[0.0, 4.0]]]])  # (1, 2, 1, 2)
    out = layer(features)
    assert out.profile.tolist() == [[pytest.approx(3.0)]] and out.locations.tolist() == [[1]]
    assert out.cost.tolist() == [[pytest.approx(0.0, abs=1e-6)]]  # the cost is the best cosine's: 2 - 2 * 1
    record = project(layer, [(features, torch.tensor([0]), torch.tensor([7]))])
    # The push picks the largest projection (3, 4), stored as the unit basis vector.
    assert layer.prototypes.tolist() == [[pytest.approx(0.6), pytest.approx(0.8)]]
    assert record.image_index.tolist() == [7] and record.location.tolist() == [1]


def test_tesnet_phases_push_once_then_tune_the_last_layer():
    head = TesNetHead(num_classes=2, backbone_channels=4, dim=4)
    phases = head.phases(30, pretrained_backbone=True)
    assert [(p.name, p.epochs, p.after, p.cached_profiles) for p in phases] == [
        ("warm", 5, (), False), ("joint", 25, ("project",), False), ("last-layer", 20, (), True)]
    assert "backbone" not in phases[0].lrs and phases[1].lrs["backbone"] == 1e-4 and phases[1].step_lr == (5, 0.1)
    scratch = head.phases(4, pretrained_backbone=False)
    assert [p.name for p in scratch] == ["joint", "last-layer"] and scratch[0].lrs["backbone"] == 1e-3


def test_tesnet_similarity_option_and_bad_value():
    assert create_head("tesnet", num_classes=2, backbone_channels=4, dim=4).prototype_spec().similarity == "projection"
    cosine = create_head("tesnet", num_classes=2, backbone_channels=4, dim=4, similarity="cosine")
    assert cosine.prototype_spec().similarity == "cosine"
    with pytest.raises(UnknownNameError, match="projection"):
        create_head("tesnet", num_classes=2, backbone_channels=4, dim=4, similarity="dot")


# --------------------------------------------------------------------------- ProtoPool

def _g(d):
    return math.log((d + 1) / (d + 1e-4))


def test_gumbel_scale_follows_the_square_root_schedule_then_stays():
    assert [gumbel_scale(e, 4) for e in (0, 1, 4, 9)] == [0.0, 500.0, 1000.0, 1000.0]


def test_slot_assignment_is_softmax_at_scale_zero_and_one_hot_in_the_limit():
    theta = torch.tensor([[[0.3], [0.1], [-0.2]]])  # one class, pool of 3, one slot
    assert torch.allclose(slot_distributions(theta, 0.0), theta.softmax(dim=1))
    for seed in range(20):
        torch.manual_seed(seed)
        soft = slot_distributions(theta, 10.0)
        assert soft.sum().item() == pytest.approx(1.0) and (soft > 0).all()  # a soft sample on the simplex
        assert slot_distributions(theta, 1e4)[0, :, 0].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)


def test_focal_similarity_mixes_distances_before_the_log():
    d_min, d_mean = torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, 3.0]])
    one_hot = torch.tensor([[[1.0], [0.0]]])  # the slot uses prototype 0
    half = torch.tensor([[[0.5], [0.5]]])
    assert focal_slot_similarity(d_min, d_mean, one_hot).item() == pytest.approx(_g(0.0) - _g(1.0))
    assert focal_slot_similarity(d_min, d_mean, half).item() == pytest.approx(_g(1.5) - _g(2.0), rel=1e-5)


def test_focal_layer_profile_is_best_patch_minus_mean_patch():
    layer = PrototypeLayer(2, 1, 2, similarity="focal", addon="linear", init="uniform", frozen=False)
    with torch.no_grad():
        layer.addon.weight.copy_(torch.eye(2)[:, :, None, None])
        layer.addon.bias.zero_()
        layer.prototypes.zero_()
    out = layer(torch.tensor([[[[0.0, 2.0]], [[0.0, 0.0]]]]))  # patches (0, 0) and (2, 0): d = 0 and 4
    assert out.profile.item() == pytest.approx(_g(0.0) - _g(2.0), rel=1e-5)
    assert out.cost.item() == 0.0 and (out.cost - out.gap_cost).item() == pytest.approx(2.0)


def test_slot_orthogonality_is_the_mean_cosine_between_a_class_slots():
    theta = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # one class, pool 2, slots (1, 0) and (1, 1)
    assert slot_orthogonality(theta).item() == pytest.approx(2 * (1 / math.sqrt(2)) / 2)


def test_pool_cluster_and_separation_pick_the_most_used_prototypes():
    distances = torch.tensor([[1.0, 5.0, 2.0, 0.5]])
    usage = torch.tensor([[0.9, 0.8, 0.1, 0.0]])
    assert pool_distance_loss(distances, usage, 2).item() == 1.0  # min over prototypes 0 and 1
    assert pool_distance_loss(distances, 2 - usage, 2).item() == 0.5  # the least used: 2 and 3


def _pool_head(**options):
    head = ProtoPoolHead(num_classes=2, backbone_channels=4, dim=2, num_prototypes=3, slots=2, **options)
    with torch.no_grad():  # class 0 uses prototypes 0 and 1, class 1 uses 2 twice
        head.slot_logits.copy_(torch.tensor([[[5.0, 0.0], [0.0, 5.0], [0.0, 0.0]],
                                             [[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]]]))
    return head


def test_protopool_class_weights_reproduce_the_slot_logits():
    head = _pool_head()
    with torch.no_grad():
        head.last_layer.weight.copy_(torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 3.0, 1.0]]))
    assert head.class_prototypes() == {0: [0, 1], 1: [2]}
    assert head.class_weights().tolist() == [[1.0, 2.0, -1.0], [0.5, 0.0, 4.0]]
    profile = torch.tensor([[0.2, 1.0, 3.0]])
    # slots see [0.2, 1.0 | 3.0, 3.0]: 0.2 + 2 - 3 and 0.1 + 9 + 3, the same as profile @ class_weights^T
    assert head.logits_from_profile(profile)[0].tolist() == pytest.approx([-0.8, 12.1])
    assert (profile @ head.class_weights().t())[0].tolist() == pytest.approx([-0.8, 12.1])
    assert head.projection_classes().tolist() == [[True, True, False], [False, False, True]]
    assert head.classes_using() == [[0], [0], [1]]


def test_protopool_loss_in_the_gumbel_limit_equals_the_hand_computed_terms():
    head = _pool_head(gumbel_epochs=1)
    head.scale = 1e4
    cost = torch.tensor([[0.0, 1.0, 2.0]])
    mean = torch.tensor([[1.0, 1.0, 3.0]])
    out = PrototypeOutputs(None, cost, cost - mean, None, None, torch.zeros(1, 4, 1, 1))
    terms = head.loss(out, torch.tensor([0]))
    slot = torch.tensor([[_g(0) - _g(1), _g(1) - _g(1)], [_g(2) - _g(3)] * 2])
    logits = torch.tensor([slot[0].sum(), slot[1].sum()])  # weights 1 own, 0 others
    assert terms["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits[None], torch.tensor([0])).item(),
                                               rel=1e-4)
    assert terms["cluster"].item() == 0.0 and terms["separation"].item() == 2.0
    assert terms["orthogonality"].item() == pytest.approx(slot_orthogonality(head.slot_logits).item())
    assert terms["l1"].item() == 0.0


def test_protopool_scale_follows_the_epochs_and_bad_slots_are_refused():
    head = _pool_head(gumbel_epochs=4)
    head.begin_epoch(None, 0, steps=1, first_step=0, run_epoch=0)
    assert head.scale == 500.0  # our first epoch is the code's epoch 1
    head.begin_epoch(None, 7, steps=1, first_step=0, run_epoch=7)
    assert head.scale == 1000.0
    with pytest.raises(ProtoKNNError, match="slots"):
        ProtoPoolHead(num_classes=2, backbone_channels=4, dim=2, num_prototypes=3, slots=4)


# --------------------------------------------------------------------------- Deformable ProtoPNet

def _identity_addon(layer):
    with torch.no_grad():
        layer.addon.weight.copy_(torch.eye(layer.addon.weight.shape[0])[:, :, None, None])
        layer.addon.bias.zero_()
    return layer


def test_deformable_sampling_at_zero_offset_equals_the_plain_cosine_layer():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 4, 5, generator=gen)
    plain = _identity_addon(PrototypeLayer(3, 4, 3, similarity="cosine", addon="linear", init="random"))
    deformable = _identity_addon(DeformablePrototypeLayer(3, 4, 3, parts=1, init="uniform"))
    with torch.no_grad():
        deformable.prototypes.copy_(plain.prototypes)
    ours, theirs = deformable(features), plain(features)
    assert torch.allclose(ours.profile, theirs.profile, atol=1e-6)
    assert torch.equal(ours.locations, theirs.locations) and torch.allclose(ours.cost, theirs.cost, atol=1e-6)
    assert ours.offsets.abs().max() == 0  # the offset conv starts at zero


def test_deformable_parts_rest_on_the_dilated_grid_and_read_zero_outside():
    assert part_grid(2, 2).tolist() == [[-1, -1], [-1, 1], [1, -1], [1, 1]]
    layer = _identity_addon(DeformablePrototypeLayer(2, 1, 2, parts=2, dilation=2, init="uniform"))
    with torch.no_grad():  # every part points along e1
        layer.prototypes.copy_(torch.tensor([[1.0, 0.0] * 4]))
    features = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]], [[0.0, 1.0], [1.0, 4.0]]]])  # (1, 2, 2, 2)
    sim, _ = layer.patch_distances(features)
    # patch (0, 0): only part (+1, +1) lands inside, on (3, 4): cos 0.6, mean over 4 parts 0.15;
    # patch (1, 1): only part (-1, -1) lands inside, on (1, 0): cos 1 -> 0.25.
    assert sim[0, 0, 0].item() == pytest.approx(0.15) and sim[0, 0, 3].item() == pytest.approx(0.25)


def test_bilinear_samples_keep_direction_and_shrink_outside_the_map():
    unit = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): e1 then e2
    half_right = torch.zeros(1, 1, 2, 1, 2)  # (B, K, (row, column), H, W)
    half_right[:, :, 1] = 0.5
    samples = sample_parts(unit, half_right)  # (1, 1, 2, 1, 2)
    assert samples[0, 0, :, 0, 0].tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2)])
    # from column 1, half a cell right: half the weight falls outside -> e2 at length sqrt(0.5)
    assert samples[0, 0, :, 0, 1].tolist() == pytest.approx([0.0, math.sqrt(0.5)], abs=1e-6)


def test_push_moves_every_part_onto_its_sampled_feature():
    layer = _identity_addon(DeformablePrototypeLayer(2, 1, 2, parts=2, dilation=2, init="uniform"))
    features = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]], [[0.0, 1.0], [1.0, 4.0]]]])
    with torch.no_grad():
        layer.prototypes.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0]]))  # matches patch (0, 0)
    record = project(layer, [(features, torch.tensor([0]), torch.tensor([5]))])
    assert record.location.tolist() == [0]
    parts = layer.prototypes.reshape(4, 2)
    assert parts[:3].abs().max() == 0 and parts[3].tolist() == pytest.approx([0.6, 0.8])


def test_part_boxes_sit_at_the_deformed_positions():
    layer = DeformablePrototypeLayer(2, 1, 2, parts=2, dilation=2)
    offsets = torch.zeros(4, 2, 3, 3)
    offsets[3, :, 1, 1] = torch.tensor([-0.5, 0.25])  # the last part moves up half a cell, right a quarter
    positions = layer.part_positions(offsets, location=4)  # patch (1, 1) of a 3 x 3 map
    assert positions.tolist() == [[0, 0], [0, 2], [2, 0], [1.5, 2.25]]
    assert part_box((0.0, 2.0), (3, 3), (30, 30)) == (20, 0, 30, 10)  # the cell (0, 2) itself
    assert part_box((1.5, 2.25), (3, 3), (30, 30)) == (22, 15, 33, 25)


def test_angular_margin_and_part_orthogonality_hand_computed():
    assert angular_margin(torch.tensor([math.cos(0.5)]), 0.1).item() == pytest.approx(math.cos(0.4), rel=1e-5)
    assert angular_margin(torch.tensor([1.0]), 0.1).item() == pytest.approx(1.0)
    parts = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # A A^T - I = [[0, .6], [.6, 0]]
    assert part_orthogonality(parts).item() == pytest.approx(math.sqrt(0.72))


def test_deformable_loss_terms_hand_computed():
    head = DeformableProtoPNetHead(num_classes=2, backbone_channels=4, dim=2, prototypes_per_class=1, parts=1)
    profile = torch.tensor([[math.cos(0.5), math.cos(0.3)]])  # image of class 0
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = PrototypeOutputs(profile, None, None, None, None, torch.zeros(1, 4, 1, 1), prototypes=prototypes,
                           offsets=torch.full((1, 1, 2, 1, 1), 0.5))
    terms = head.loss(out, torch.tensor([0]))
    inflated = [math.cos(0.5), math.cos(0.2)]  # the margin raises the wrong class's similarity only
    logits = torch.tensor([[inflated[0] - 0.5 * inflated[1], inflated[1] - 0.5 * inflated[0]]])
    assert terms["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor([0])).item(),
                                               rel=1e-5)
    assert terms["cluster"].item() == pytest.approx(inflated[0]) and terms["separation"].item() == pytest.approx(
        inflated[1], rel=1e-5)
    assert terms["orthogonality"].item() == pytest.approx(0.0, abs=1e-5) and terms["offset"].item() == 0.25
    expected = terms["ce"] - 0.8 * inflated[0] + 0.08 * inflated[1] + 0.1 * terms["orthogonality"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert not head.last_layer.weight.requires_grad  # frozen, as in the code


def test_deformable_phases_hold_the_offsets_back_then_push_once():
    head = DeformableProtoPNetHead(num_classes=2, backbone_channels=4, dim=4)
    phases = head.phases(30, pretrained_backbone=True)
    assert [(p.name, p.epochs, p.after) for p in phases] == [
        ("warm", 5, ()), ("warm-offsets-fixed", 5, ()), ("joint", 20, ("project",))]
    assert "offsets" not in phases[1].lrs and phases[2].lrs["offsets"] == 1e-4 and phases[2].step_lr == (5, 0.2)
    assert [p.name for p in head.phases(3, pretrained_backbone=False)] == ["joint"]


# --------------------------------------------------------------------------- registry

def test_heads_all_names_every_registered_head():
    rows = parse_rows("all")
    assert sorted(head for _, head in rows) == sorted(list_heads()) and {"tesnet", "protopnet", "protoknn"} <= set(list_heads())
    assert [label for label, _ in rows] == [head for _, head in rows]  # each row named after its head


# --------------------------------------------------------------------------- the CLI chain per head

CHAIN_HEADS = {"tesnet": [], "protopool": [], "deformable-protopnet": [],
               "ppn-cos": ["--head-opt", "protopnet.similarity=cosine"]}


def _head_of(label):
    return "protopnet" if label == "ppn-cos" else label


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Per head: train (one run on images, one on the frozen-backbone cache), then every later command."""
    root = tmp_path_factory.mktemp("paper-heads")
    from protoknn_plugin.data import create_dataset

    (root / "imgs").mkdir()
    create_dataset("animals", limit=200).train_plain.raw_image(3).save(root / "imgs" / "train3.png")
    trains = {}
    for label, extra in CHAIN_HEADS.items():
        base = ["train", "--head", _head_of(label), *TINY, *extra, "--workers", "0"]
        trains[label] = base + ["--out", root / label]
        trains[label + "-frozen"] = base + ["--frozen-backbone", "--cache-dir", root / "cache", "--out",
                                           root / (label + "-frozen")]
    trained = run_cli_parallel({k: v for k, v in trains.items() if not k.endswith("-frozen")})
    trained.update(run_cli_parallel({k: v for k, v in trains.items() if k.endswith("-frozen")}))  # one cache writer
    for name, result in trained.items():
        assert result.returncode == 0, (name, result.stderr)
    cases = {}
    for label in CHAIN_HEADS:
        run = root / label
        cases.update({
            f"{label}:evaluate": ["evaluate", run],
            f"{label}:explain": ["explain", run, "--image", "3", "--top", "3", "--out", root / f"{label}.png"],
            f"{label}:prototypes": ["prototypes", run, "--out", root / f"{label}-grid.png"],
            f"{label}:faithfulness": ["faithfulness", run, "--images", "20", "--m", "1,2"],
            f"{label}:predict": ["predict", run, root / "imgs", "--workers", "0", "--out", root / f"{label}.csv"],
        })
    results = run_cli_parallel(cases)
    # The report reuses faithfulness.json, so it runs after faithfulness.
    results.update(run_cli_parallel({f"{label}:report": ["report", root / label, "--out", root / f"site-{label}",
                                                          "--images", "2"] for label in CHAIN_HEADS}))
    return root, results


@pytest.mark.parametrize("label", list(CHAIN_HEADS))
def test_cli_chain_of_each_paper_head(chains, label):
    root, results = chains
    for step in ("evaluate", "explain", "prototypes", "faithfulness", "predict", "report"):
        result = results[f"{label}:{step}"]
        assert result.returncode == 0, (step, result.stderr)
    assert "accuracy[top1]" in results[f"{label}:evaluate"].stdout
    assert (root / f"{label}.png").read_bytes()[:4] == b"\x89PNG"
    if label == "protopool":  # the explanation names the pool prototypes the predicted class uses
        assert "uses the pool prototypes" in results[f"{label}:explain"].stdout
    saved = json.loads((root / label / "faithfulness.json").read_text())
    assert saved["deletion"]["score"] == "logit of the predicted class" and set(saved["deletion"]["by_m"]) == {"1", "2"}
    (row,) = csv.DictReader((root / f"{label}.csv").open())
    assert row["class_1"] == row["predicted_class"] and row["prototype_1"] != ""
    assert (root / f"site-{label}" / "index.html").is_file()
    frozen = load_checkpoint(root / (label + "-frozen"))
    assert frozen["model_config"]["head"] == _head_of(label) and frozen["train_state"]["complete"]
    assert frozen["data"]["frozen_backbone"] is True


def test_heads_command_lists_each_paper_head_with_its_losses_and_keys():
    result = run_cli("heads")
    assert result.returncode == 0, result.stderr
    for words in ("tesnet", "orthonormality", "subspace", "similarity", "orthonormality_weight",
                  "protopool", "Gumbel", "focal", "slots", "gumbel_epochs",
                  "deformable-protopnet", "offset", "margin", "orthogonality_weight"):
        assert words in result.stdout, words


# --------------------------------------------------------------------------- cosine ProtoPNet

def test_cosine_protopnet_scores_cosines_and_pays_cluster_on_the_unit_sphere():
    head = create_head("protopnet", num_classes=2, backbone_channels=2, dim=2, num_prototypes=2, similarity="cosine")
    assert create_head("protopnet", num_classes=2, backbone_channels=2, dim=2).prototype_spec().similarity == "log"
    spec = head.prototype_spec()
    layer = PrototypeLayer(2, 2, 2, similarity=spec.similarity, addon="linear", init="uniform", frozen=False)
    with torch.no_grad():
        layer.addon.weight.copy_(torch.eye(2)[:, :, None, None])
        layer.addon.bias.zero_()
        layer.prototypes.copy_(torch.tensor([[5.0, 0.0], [0.0, 0.1]]))  # lengths do not matter
    out = layer(torch.tensor([[[[3.0]], [[4.0]]]]))  # one patch (3, 4): cosines 0.6 and 0.8
    assert out.profile.tolist() == [[pytest.approx(0.6), pytest.approx(0.8)]]
    terms = head.loss(out, torch.tensor([0]))
    assert terms["cluster"].item() == pytest.approx(2 - 2 * 0.6) and terms["separation"].item() == pytest.approx(2 - 2 * 0.8)
    with pytest.raises(UnknownNameError, match="cosine"):
        create_head("protopnet", num_classes=2, backbone_channels=2, dim=2, similarity="dot")
