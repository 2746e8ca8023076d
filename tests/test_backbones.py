"""Backbones: shapes, cut points, weight loading (local, ImageNet cache, offline), errors."""
from __future__ import annotations

import os
import re
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from protoknn_plugin.backbones import (
    Backbone,
    EfficientNetLite0Backbone,
    create_backbone,
    describe_backbones,
    list_backbones,
)
from protoknn_plugin.errors import ProtoKNNError, UnknownNameError

ALL = list_backbones()
TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet152", "vgg16", "vgg19", "densenet121", "densenet161"]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    # Tiny inputs gain nothing from threads, and OpenMP workers spin-wait badly (10x slower)
    # when other processes share the two cores.
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ---- registry and shapes --------------------------------------------------------------------


def test_all_expected_backbones_are_registered():
    assert set(TORCHVISION + ["efficientnet-lite0", "small-cnn"]) <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_forward_gives_out_channels_and_the_described_map_size(name):
    if name == "small-cnn":
        net, x = create_backbone(name, in_channels=1), torch.rand(2, 1, 28, 28)
    else:
        size = 32 if name in ("resnet152", "densenet161") else 64  # the big two: keep it cheap
        net, x = create_backbone(name, weights=None), torch.rand(1, 3, size, size)
    assert isinstance(net, Backbone) and net.name == name
    with torch.no_grad():
        out = net.eval()(x)
    side = type(net).feature_size(x.shape[-1])
    assert out.shape == (x.shape[0], net.out_channels, side, side)


def test_small_cnn_default_is_7x7_with_128_channels():
    net = create_backbone("small-cnn", in_channels=1)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 128, 7, 7)


@pytest.mark.parametrize("width, depth, channels", [(4, 2, 16), (4, 3, 16), (2, 6, 8)])
def test_small_cnn_width_and_depth_set_channels_and_keep_7x7(width, depth, channels):
    net = create_backbone("small-cnn", in_channels=3, width=width, depth=depth)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == depth and convs[0].in_channels == 3
    assert net.out_channels == channels
    assert net(torch.rand(2, 3, 28, 28)).shape == (2, channels, 7, 7)


def test_resnet18_at_224_gives_7x7():
    net = create_backbone("resnet18", weights=None).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 224, 224)).shape == (1, 512, 7, 7)


def test_describe_lists_every_backbone_with_its_map():
    rows = {row["name"]: row for row in describe_backbones()}
    assert set(rows) == set(ALL)
    assert rows["resnet18"]["feature_map"] == "7x7 @ 224px" and rows["resnet18"]["out_channels"] == 512
    assert rows["small-cnn"]["feature_map"] == "7x7 @ 28px" and rows["small-cnn"]["out_channels"] == 128
    assert "imagenet" in rows["efficientnet-lite0"]["weights"]
    assert all(row["description"] for row in rows.values())


# ---- cut points: the trunk reproduces torchvision's own forward --------------------------------


def test_resnet18_trunk_with_torchvision_pool_and_fc_reproduces_the_classifier(tmp_path):
    full = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18_full.pth"
    torch.save(full.state_dict(), path)  # fc.* must be dropped on load
    net = create_backbone("resnet18", weights=str(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits = full.fc(torch.flatten(full.avgpool(net(x)), 1))
        torch.testing.assert_close(logits, full(x))


def test_densenet121_trunk_includes_the_final_relu():
    full = torchvision.models.densenet121().eval()
    net = create_backbone("densenet121", weights=None).eval()
    net.trunk.features.load_state_dict(full.features.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        logits = full.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
        torch.testing.assert_close(logits, full(x))
    assert out.min() >= 0


def test_vgg16_keeps_torchvision_feature_keys_and_its_last_max_pool():
    features = torchvision.models.vgg16().features.eval()
    net = create_backbone("vgg16", weights=None).eval()
    net.trunk.load_state_dict({f"features.{k}": v for k, v in features.state_dict().items()}, strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), features(x))
    no_pool = create_backbone("vgg16", weights=None, drop_last_pool=True)
    assert no_pool(torch.rand(1, 3, 64, 64)).shape == (1, 512, 4, 4)


# ---- grey input -------------------------------------------------------------------------------


def test_grey_input_equals_the_rgb_trunk_on_the_repeated_channel():
    rgb = create_backbone("resnet18", weights=None).eval()
    grey = create_backbone("resnet18", weights=None, in_channels=1).eval()
    grey.load_state_dict(rgb.state_dict())
    x = torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)))
    assert len(grey.mean) == 1 and grey.mean[0] == pytest.approx(sum(rgb.mean) / 3)


def test_wrong_channel_count_and_unsupported_in_channels_raise():
    net = create_backbone("resnet18", weights=None)
    with pytest.raises(ProtoKNNError) as err:
        net(torch.rand(1, 1, 32, 32))
    assert "in_channels" in _one_line(err)
    with pytest.raises(ProtoKNNError):
        create_backbone("resnet18", weights=None, in_channels=2)
    with pytest.raises(ProtoKNNError):
        create_backbone("vgg16", weights=None)(torch.rand(1, 3, 16, 16))  # five poolings need 32 px


# ---- weights=PATH -------------------------------------------------------------------------------


def _prefixed_trunk_state(net: Backbone, prefix: str) -> dict:
    state = {prefix + k: v.clone() for k, v in net.trunk.state_dict().items()}
    state[prefix + "fc.weight"] = torch.randn(10, net.out_channels)
    state[prefix + "fc.bias"] = torch.randn(10)
    return state


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s, "epoch": 3}, lambda s: {"model": s}])
def test_local_state_dict_with_prefix_and_fc_loads_exactly(tmp_path, wrap):
    source = create_backbone("resnet18", weights=None)
    path = tmp_path / "trunk.pth"
    torch.save(wrap(_prefixed_trunk_state(source, "module.")), path)
    net = create_backbone("resnet18", weights=str(path))
    assert net.weights == str(path)
    for (k, a), (_, b) in zip(source.state_dict().items(), net.state_dict().items()):
        assert torch.equal(a, b), k
    assert not torch.equal(net.trunk.conv1.weight, create_backbone("resnet18", weights=None).trunk.conv1.weight)


def test_mismatched_state_dict_names_keys_on_one_line(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(create_backbone("resnet34", weights=None).trunk.state_dict(), path)
    with pytest.raises(ProtoKNNError) as err:
        create_backbone("resnet18", weights=str(path))
    message = _one_line(err)
    assert "unexpected" in message and re.search(r"layer\d\.\d+\.", message)
    assert "resnet18" in message


def test_wrong_shapes_are_reported(tmp_path):
    state = create_backbone("small-cnn", in_channels=1, width=8).trunk.state_dict()
    path = tmp_path / "small.pth"
    torch.save(state, path)
    with pytest.raises(ProtoKNNError) as err:
        create_backbone("small-cnn", in_channels=1, width=4, weights=str(path))
    assert "wrong-shape" in _one_line(err) and "0.conv.weight" in str(err.value)


def test_missing_and_non_state_dict_files_raise(tmp_path):
    with pytest.raises(ProtoKNNError) as err:
        create_backbone("resnet18", weights=str(tmp_path / "nope.pth"))
    assert "not found" in _one_line(err)
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ProtoKNNError) as err:
        create_backbone("resnet18", weights=str(path))
    assert "state dict" in _one_line(err)


def test_bbn_inaturalist_layout_maps_cb_block_to_layer4_2(tmp_path):
    target = create_backbone("resnet50", weights=None)
    bbn = {}
    for key, value in target.trunk.state_dict().items():
        bbn["module.backbone." + key.replace("layer4.2.", "cb_block.")] = value.clone()
        if key.startswith("layer4.2."):
            bbn["module.backbone." + key.replace("layer4.2.", "rb_block.")] = torch.randn_like(value.float())
    bbn["module.classifier.weight"] = torch.randn(5089, 4096)
    path = tmp_path / "bbn.pth"
    torch.save(bbn, path)
    net = create_backbone("resnet50", weights=str(path))
    for (k, a), (_, b) in zip(target.trunk.state_dict().items(), net.trunk.state_dict().items()):
        assert torch.equal(a, b), k


# ---- weights="imagenet" (torchvision download) --------------------------------------------------


def _cache_file(tmp_path, weights_enum) -> str:
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / os.path.basename(weights_enum.url))


def test_imagenet_offline_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache forces a download

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ProtoKNNError) as err:
        create_backbone("resnet18", weights="imagenet")
    message = _one_line(err)
    assert "download" in message and "--weights PATH" in message
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url in message


def test_imagenet_loads_torchvision_file_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    full = torchvision.models.resnet18()
    torch.save(full.state_dict(), _cache_file(tmp_path, torchvision.models.ResNet18_Weights.IMAGENET1K_V1))
    net = create_backbone("resnet18", weights="imagenet")
    assert net.weights == "imagenet"
    assert torch.equal(net.trunk.layer4[1].conv2.weight, full.layer4[1].conv2.weight)


def test_imagenet_densenet_file_with_old_key_names_is_remapped(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    full = torchvision.models.densenet121()
    # torchvision's published densenet files say "norm.1" where the modules now say "norm1".
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in full.state_dict().items()}
    assert any(".norm.1." in k for k in old)
    torch.save(old, _cache_file(tmp_path, torchvision.models.DenseNet121_Weights.IMAGENET1K_V1))
    net = create_backbone("densenet121", weights="imagenet")
    block = net.trunk.features.denseblock1.denselayer1
    assert torch.equal(block.norm1.running_mean, full.features.denseblock1.denselayer1.norm1.running_mean)


def test_small_cnn_has_no_imagenet_weights():
    with pytest.raises(ProtoKNNError) as err:
        create_backbone("small-cnn", in_channels=1, weights="imagenet")
    assert "no ImageNet weights" in _one_line(err)


# ---- efficientnet-lite0 -----------------------------------------------------------------------


def _chelsea_batch(net: Backbone) -> torch.Tensor:
    """skimage's cat photo, evaluated like the TF EfficientNet-Lite: short side 256, centre 224."""
    from skimage.data import chelsea

    image = torch.from_numpy(chelsea()).permute(2, 0, 1).float().div(255)[None]  # (1, 3, 300, 451)
    h, w = image.shape[-2:]
    scale = 256 / min(h, w)
    image = F.interpolate(image, size=(round(h * scale), round(w * scale)), mode="bilinear",
                          antialias=True, align_corners=False)
    top, left = (image.shape[-2] - 224) // 2, (image.shape[-1] - 224) // 2
    image = image[..., top:top + 224, left:left + 224]
    mean, std = torch.tensor(net.mean)[:, None, None], torch.tensor(net.std)[:, None, None]
    return (image - mean) / std


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0Backbone:
    """Loaded once: the shipped ImageNet file is the default weights. Tests must not modify it."""
    return create_backbone("efficientnet-lite0").eval()


def test_efficientnet_lite0_shipped_weights_see_a_cat(lite0):
    net = lite0
    assert isinstance(net, EfficientNetLite0Backbone) and net.weights == "imagenet"
    x = _chelsea_batch(net)
    with torch.no_grad():
        top1 = int(net.classifier_logits(x).argmax(1))
        features = net(x)
    assert 281 <= top1 <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert features.shape == (1, 1280, 7, 7)


def test_efficientnet_lite0_random_and_local_file(tmp_path, lite0):
    pretrained = lite0
    random = create_backbone("efficientnet-lite0", weights=None).eval()
    assert random.weights is None
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(random(x), pretrained(x))
    state = {k: v for k, v in pretrained.trunk.state_dict().items() if not k.startswith("_fc.")}
    state["_fc.weight"], state["_fc.bias"] = torch.randn(10, 1280), torch.randn(10)  # another task's head
    path = tmp_path / "lite0.pth"
    torch.save({"model": state}, path)
    loaded = create_backbone("efficientnet-lite0", weights=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pretrained(x))


def test_efficientnet_lite0_grey_input_repeats_the_channel(lite0):
    net = create_backbone("efficientnet-lite0", weights=None, in_channels=1).eval()
    net.load_state_dict(lite0.state_dict())
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), lite0(x.repeat(1, 3, 1, 1)))


# ---- names and options --------------------------------------------------------------------------


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(UnknownNameError) as err:
        create_backbone("resnt18")
    assert "'resnet18'" in _one_line(err)
    assert isinstance(err.value, ProtoKNNError)


def test_unknown_and_bad_options_raise_protoknn_error():
    with pytest.raises(ProtoKNNError) as err:
        create_backbone("resnet18", weights=None, width=8)
    assert "width" in _one_line(err) and "in_channels" in str(err.value)
    with pytest.raises(ProtoKNNError):
        create_backbone("small-cnn", in_channels=1, depth=1)
    with pytest.raises(ProtoKNNError):
        create_backbone("resnet18", weights=123)


def test_input_normalisation_is_converted_to_the_backbone_own():
    """Images normalised with ImageNet statistics reach EfficientNet-Lite0 as (x - 127/255) / (128/255)."""
    from protoknn_plugin.backbones import create_backbone
    from protoknn_plugin.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    backbone = create_backbone("efficientnet-lite0", weights="none")
    seen = {}
    backbone.extract = lambda x: seen.setdefault("x", x)
    pixels = torch.rand(2, 3, 8, 8)
    imagenet = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    backbone.set_input_normalization(IMAGENET_MEAN, IMAGENET_STD)
    backbone(imagenet)
    assert torch.allclose(seen["x"], (pixels - 127 / 255) / (128 / 255), atol=1e-5)
    # the backbone's own statistics: no conversion at all
    backbone.set_input_normalization(backbone.mean, backbone.std)
    seen.clear()
    backbone(imagenet)
    assert seen["x"] is imagenet


def test_model_config_for_data_converts_only_for_pretrained_backbones():
    from protoknn_plugin.data import create_dataset
    from protoknn_plugin.model import ModelConfig

    splits = create_dataset("animals", limit=20)
    scratch = ModelConfig.for_data(splits, backbone="small-cnn")
    assert (scratch.num_classes, scratch.in_channels, scratch.input_mean) == (10, 1, None)
    lite = ModelConfig.for_data(splits, backbone="efficientnet-lite0")  # shipped ImageNet weights by default
    assert lite.input_mean == tuple(splits.mean) and lite.input_std == tuple(splits.std)
    assert ModelConfig.for_data(splits, backbone="efficientnet-lite0", weights="none").input_mean is None
