"""N processes train like one process on the same global batch (gloo on CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from protoknn_plugin import distributed
from protoknn_plugin.checkpoint import load_checkpoint
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.heads import create_head
from protoknn_plugin.prototypes import PrototypeLayer

from conftest import TINY, spawn_ranks


def _setup_pieces():
    torch.manual_seed(0)
    layer = PrototypeLayer(6, 8, 5)
    head = create_head("protoknn", num_classes=4, backbone_channels=6, dim=5, num_prototypes=8)
    features = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    return layer, head, features, labels


def _grads(layer, head):
    params = list(layer.addon.parameters()) + list(head.parameters())
    return [p.grad.clone() if p.grad is not None else None for p in params]


def _single_process_grads():
    layer, head, features, labels = _setup_pieces()
    torch.manual_seed(123)  # the Gumbel draws of the cluster loss
    head.loss(layer(features), labels)["total"].backward()
    return _grads(layer, head)


class _Pieces(torch.nn.Module):
    """The prototype layer and head as one module, so DDP sees every parameter."""

    def __init__(self, layer, head):
        super().__init__()
        self.layer, self.head = layer, head

    def forward(self, features, labels):
        out = distributed.gather_outputs(self.layer(features))
        return self.head.loss(out, distributed.gather_labels(labels))["total"]


def _worker(rank, world, result_file):
    from torch.nn.parallel import DistributedDataParallel

    layer, head, features, labels = _setup_pieces()
    local = list(range(rank, len(labels), world))
    ddp = DistributedDataParallel(_Pieces(layer, head), find_unused_parameters=True)
    torch.manual_seed(123)
    ddp(features[local], labels[local]).backward()
    global_labels = distributed.gather_labels(labels[local])
    if rank == 0:
        torch.save({"grads": _grads(layer, head), "labels": global_labels}, result_file)


def test_ddp_with_gathered_loss_gives_single_process_gradients(tmp_path):
    expected = _single_process_grads()
    spawn_ranks(_worker, 2, tmp_path, str(tmp_path / "result.pt"))
    got = torch.load(tmp_path / "result.pt")
    assert got["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # global batch order restored
    assert len(got["grads"]) == len(expected)
    checked = 0
    for g, e in zip(got["grads"], expected):
        assert (g is None) == (e is None)
        if e is not None:
            assert torch.allclose(g, e, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked >= 3


def _rank_whose_peer_dies(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dist.barrier()  # both ranks are in the group
    if rank == 1:
        os._exit(0)  # leaves without the final barrier, like a crashed peer
    try:
        distributed.teardown(timeout_s=20)
        outcome = "returned"
    except ProtoKNNError as err:
        outcome = str(err)
    with open(result_file, "w") as handle:
        handle.write(outcome)


def test_teardown_after_a_peer_died_ends_in_one_line(tmp_path):
    result = tmp_path / "outcome.txt"
    mp.spawn(_rank_whose_peer_dies, args=(2, str(tmp_path / "store"), str(result)), nprocs=2, join=True)
    outcome = result.read_text()
    assert outcome.startswith("rank 0 could not reach the final barrier"), outcome
    assert "\n" not in outcome and "--resume" in outcome


def test_shard_refuses_uneven_global_batch(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(Exception, match="split evenly"):
        distributed.shard([1, 2, 3])


def test_torchrun_two_processes_match_one_process(tmp_path):
    """Tolerance: the per-epoch mean loss agrees within 3% (BatchNorm uses each rank's local
    statistics on CPU, since torch has no CPU SyncBatchNorm; everything else is identical)."""
    args = ["train", "--head", "protoknn", *TINY]
    args[args.index("--epochs") + 1] = "2"
    args[args.index("--steps-per-epoch") + 1] = "4"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "protoknn_plugin", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "protoknn_plugin",
                          *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.csv",
                                                                  "metrics.json"]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["test_images"] == 200
    hist = [load_checkpoint(tmp_path / d)["train_state"]["history"] for d in ("one", "two")]
    assert len(hist[0]) == len(hist[1]) == 2
    for a, b in zip(*hist):
        assert b["total"] == pytest.approx(a["total"], rel=0.03)
