"""--head-opt HEAD.KEY=VALUE and LABEL=HEAD rows: parsing, routing, and the one-line errors."""
import json

import pytest
from protoknn_plugin.checkpoint import load_checkpoint

from conftest import TINY, assert_one_line_error, run_cli
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.heads import get_head_class
from protoknn_plugin.heads.options import assign_head_options, option_keys, parse_rows, parse_value


def test_values_are_read_as_their_types():
    assert parse_value("5") == 5 and parse_value("1e-3") == 1e-3 and parse_value("0.05") == 0.05
    assert parse_value("true") is True and parse_value("False") is False and parse_value("none") is None
    assert parse_value("5,0.1") == (5, 0.1) and parse_value("(1,3,5)") == (1, 3, 5)
    assert parse_value("sum") == "sum" and parse_value("proxy-anchor") == "proxy-anchor"


def test_option_keys_are_the_constructor_arguments_the_model_does_not_pass():
    keys = option_keys(get_head_class("protoknn"))
    assert {"reg", "tau", "margin", "beta", "cost_space", "lr"} <= set(keys)
    assert not {"num_classes", "backbone_channels", "dim", "num_prototypes", "self"} & set(keys)
    assert "warm_epochs" in option_keys(get_head_class("protopnet"))


def test_rows_and_labels():
    assert parse_rows("pk=protoknn, pk-sum=protoknn,cnn") == [("pk", "protoknn"), ("pk-sum", "protoknn"), ("cnn", "cnn")]
    with pytest.raises(ProtoKNNError, match="twice"):
        parse_rows("protoknn,protoknn")


def test_a_label_targets_one_row_a_head_name_every_row_of_it_and_the_label_wins():
    rows = [("pk", "protoknn"), ("pk-sum", "protoknn"), ("cnn", "cnn")]
    options = assign_head_options(rows, ["protoknn.reg=0.1", "pk-sum.cluster_reduction=sum", "pk-sum.reg=0.2",
                                         "cnn.lr=3e-4"])
    assert options == {"pk": {"reg": 0.1}, "pk-sum": {"reg": 0.2, "cluster_reduction": "sum"}, "cnn": {"lr": 3e-4}}


def test_unknown_key_or_target_names_the_valid_ones():
    with pytest.raises(ProtoKNNError, match=r"no option 'rge'; valid keys: .*reg"):
        assign_head_options([("protoknn", "protoknn")], ["protoknn.rge=0.1"])
    with pytest.raises(ProtoKNNError, match="no row or head here; use one of: cnn"):
        assign_head_options([("cnn", "cnn")], ["protoknn.reg=0.1"])
    with pytest.raises(ProtoKNNError, match="HEAD.KEY=VALUE"):
        assign_head_options([("cnn", "cnn")], ["lr=0.1"])


def test_train_cli_head_opt_reaches_the_head(tmp_path):
    result = run_cli("train", "--head", "protoknn", *TINY, "--head-opt", "protoknn.reg=0.1",
                     "--head-opt", "protoknn.margin=0.3", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    saved = load_checkpoint(tmp_path)
    assert saved["model_config"]["head_options"]["reg"] == 0.1
    assert saved["model_config"]["head_options"]["margin"] == 0.3


def test_cli_unknown_key_is_one_line_and_exit_2(tmp_path):
    for command in (["train", "--head", "protoknn"], ["benchmark", "--heads", "protoknn"], ["ablate", "--variants", "full"]):
        result = run_cli(*command, *TINY, "--head-opt", "protoknn.rge=0.1", "--out", tmp_path / command[0])
        assert_one_line_error(result, "rge", "valid keys", "reg")
        assert result.returncode == 2


def test_benchmark_same_head_twice_with_different_options(tmp_path):
    result = run_cli("benchmark", "--heads", "pk=protoknn,pk-sum=protoknn", "--head-opt", "pk-sum.cluster_reduction=sum",
                     *TINY, "--seeds", "0", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {(r["label"], r["head_options"].get("cluster_reduction")) for r in runs} == {("pk", None), ("pk-sum", "sum")}
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(names) == 2 and names[0].startswith("pk-") and names[1].startswith("pk-sum-")
