"""The comparison protocol as code: budgets counted from the phases, the equal-budget check,
ProtoPNet's reference hyperparameters, the lr sweep knob and run-directory names."""
import pytest

from protoknn_plugin.benchmark import BenchmarkSettings, RunSpec, run_dir_name, run_key
from protoknn_plugin.benchmark import settings as settings_module
from protoknn_plugin.benchmark.protocol import budget, check_same_budget, scale_lrs
from protoknn_plugin.errors import ProtoKNNError
from protoknn_plugin.heads import create_head
from protoknn_plugin.train import TrainConfig


def _phases(name, epochs, pretrained, frozen_backbone=False, **options):
    head = create_head(name, num_classes=10, backbone_channels=8, dim=8, num_prototypes=100, **options)
    return head.phases(epochs, pretrained, frozen_backbone=frozen_backbone)


def test_protopnet_from_scratch_has_no_warm_phase_and_the_reference_weight_decay():
    phases = _phases("protopnet", 4, pretrained=False)
    assert [p.name for p in phases] == ["joint", "last-layer"]
    joint = phases[0]
    assert joint.lrs == {"backbone": 1e-3, "addon": 3e-3, "prototypes": 3e-3}
    assert joint.weight_decay == {"backbone": 1e-3, "addon": 1e-3}  # none on the prototypes


def test_protopnet_pretrained_warms_inside_the_budget():
    phases = _phases("protopnet", 8, pretrained=True)
    assert [(p.name, p.epochs) for p in phases] == [("warm", 2), ("joint", 6), ("last-layer", 20)]
    assert "backbone" not in phases[0].lrs and phases[1].lrs["backbone"] == 1e-4


def test_budget_by_hand():
    # 8 pretrained epochs of 5 steps of 110 images: warm 2 epochs see images but do not step the
    # backbone; the last layer runs 20 epochs of ceil(1000 / 110) = 10 steps; one push.
    b = budget(_phases("protopnet", 8, pretrained=True), steps_per_epoch=5, batch_size=110, train_images=1000)
    assert b == {"feature_steps": 40, "images_seen": 4400, "backbone_steps": 30, "last_layer_epochs": 20,
                 "last_layer_steps": 200, "pushes": 1}
    k = budget(_phases("protoknn", 8, pretrained=True), steps_per_epoch=5, batch_size=110, train_images=1000)
    assert k == {"feature_steps": 40, "images_seen": 4400, "backbone_steps": 40, "last_layer_epochs": 0,
                 "last_layer_steps": 0, "pushes": 1}


def test_a_frozen_backbone_gets_no_warm_phase_and_no_backbone_steps():
    # The warm phase protects a backbone that trains; a frozen one gives its 2 epochs to the joint phase.
    phases = _phases("protopnet", 8, pretrained=True, frozen_backbone=True)
    assert [(p.name, p.epochs) for p in phases] == [("joint", 8), ("last-layer", 20)]
    b = budget(phases, steps_per_epoch=5, batch_size=110, train_images=1000, frozen_backbone=True)
    assert b["backbone_steps"] == 0 and b["images_seen"] == 4400


def test_a_row_that_changes_its_papers_last_layer_epochs_or_pushes_is_marked():
    from protoknn_plugin.benchmark.protocol import schedule_change
    from protoknn_plugin.benchmark.tables import markdown_table, schedule_changes, summarise

    paper = budget(_phases("protopnet", 30, pretrained=False), 5, 110, 1000)
    short = budget(_phases("protopnet", 30, pretrained=False, last_layer_epochs=5, push_start=30), 5, 110, 1000)
    assert paper["pushes"] == 3 and short["pushes"] == 1  # pushes at 10, 20 and the end, or only at the end
    # 20 last-layer epochs after each of 3 pushes, against 5 after one.
    assert schedule_change(short, paper) == "last-layer epochs 5 (paper 60), pushes 1 (paper 3)"
    assert schedule_change(paper, paper) == ""
    meta = {"budgets": {"ppn": dict(paper), "ppn-short": {**short, "schedule_change": schedule_change(short, paper)}}}
    runs = [{"label": label, "head": "protopnet", "seed": 0, "accuracy": 0.5} for label in ("ppn", "ppn-short")]
    table = markdown_table(summarise(runs), runs, marked=schedule_changes(meta))
    assert table[2].startswith("| ppn | ") and table[3].startswith("| ppn-short † | ")


def test_default_heads_get_the_same_budget_from_scratch():
    budgets = {name: budget(_phases(name, 4, pretrained=False), 72, 110, 7200) for name in ("protoknn", "protopnet", "cnn")}
    check_same_budget(budgets, pretrained=False)
    assert {b["backbone_steps"] for b in budgets.values()} == {288}


def test_unequal_budgets_are_refused():
    budgets = {"a": {"images_seen": 100, "backbone_steps": 10}, "b": {"images_seen": 100, "backbone_steps": 8}}
    check_same_budget(budgets, pretrained=True)  # warm epochs: fewer backbone steps is allowed
    with pytest.raises(ProtoKNNError, match="backbone_steps: a 10, b 8"):
        check_same_budget(budgets, pretrained=False)
    with pytest.raises(ProtoKNNError, match="images_seen"):
        check_same_budget({"a": {"images_seen": 100, "backbone_steps": 0},
                           "b": {"images_seen": 90, "backbone_steps": 0}}, pretrained=True)


def test_scale_lrs_multiplies_every_rate_and_keeps_the_rest():
    phases = _phases("protopnet", 4, pretrained=False)
    scaled = scale_lrs(phases, 0.5)
    assert scaled[0].lrs == {"backbone": 5e-4, "addon": 1.5e-3, "prototypes": 1.5e-3}
    assert scaled[1].lrs == {"last_layer": 5e-5} and scaled[0].weight_decay == phases[0].weight_decay
    assert phases[0].lrs["backbone"] == 1e-3  # the head's own phases are untouched


def test_plain_cnn_warms_up_then_decays():
    (phase,) = _phases("cnn", 4, pretrained=False)
    assert phase.schedule_name == "cosine" and phase.warmup_epochs == 0.5


def test_run_directory_names_change_with_options_not_with_seed():
    settings = BenchmarkSettings(train=TrainConfig(epochs=4))
    spec = RunSpec("pk-sum", "protoknn", {"cluster_reduction": "sum"})
    key = run_key(spec, settings, 1.0)
    assert run_dir_name(spec, settings, 1.0, 2) == f"pk-sum-{key}-seed2"
    assert run_key(RunSpec("pk-sum", "protoknn", {"cluster_reduction": "mean"}), settings, 1.0) != key
    assert run_key(spec, settings, 0.5) != key
    assert run_key(spec, BenchmarkSettings(train=TrainConfig(epochs=5)), 1.0) != key
    assert run_key(spec, BenchmarkSettings(train=TrainConfig(epochs=4, seed=7), seeds=(3, 4)), 1.0) == key
    assert run_dir_name(RunSpec("full:sum", "protoknn"), settings, 1.0, 0).startswith("full-sum-")
    # Workers change speed, not results: a rerun with other --workers resumes the same runs.
    assert run_key(spec, BenchmarkSettings(train=TrainConfig(epochs=4), workers=4), 1.0) == key


def test_a_head_revision_enters_the_run_key_so_runs_under_an_old_default_are_not_reused(monkeypatch):
    from protoknn_plugin.heads.protopnet import ProtoPNetHead

    settings = BenchmarkSettings(train=TrainConfig(epochs=4))
    protopnet, protoknn = RunSpec("protopnet", "protopnet"), RunSpec("protoknn", "protoknn")
    keys = {ProtoPNetHead.revision: run_key(protopnet, settings, 1.0)}
    knn_key = run_key(protoknn, settings, 1.0)
    for revision in (1, ProtoPNetHead.revision + 1):
        monkeypatch.setattr(ProtoPNetHead, "revision", revision)
        keys[revision] = run_key(protopnet, settings, 1.0)
        assert run_key(protoknn, settings, 1.0) == knn_key  # other heads keep their runs
    assert len(set(keys.values())) == 3


PINNED_MACHINE = {"threads": 2, "device_kind": "cpu: pinned"}


def test_run_keys_of_unrevised_heads_are_stable_across_releases(monkeypatch):
    # Finished runs are found by this hash; if it changes, every user's finished runs are
    # silently retrained. A new setting must default to a value that leaves it out of the key
    # (see settings._NOT_IN_KEY), or this pinned value changes on purpose.
    monkeypatch.setattr(settings_module, "machine_identity", lambda device: dict(PINNED_MACHINE))
    settings = BenchmarkSettings(train=TrainConfig(epochs=4, val_fraction=0.1))
    assert run_key(RunSpec("protoknn", "protoknn"), settings, 1.0) == "df08eb58"
    assert run_key(RunSpec("cnn", "cnn"), settings, 1.0) == "89897f42"


def test_the_run_key_holds_the_thread_count_and_the_device_kind(monkeypatch):
    import torch

    settings, spec = BenchmarkSettings(train=TrainConfig(epochs=4)), RunSpec("protoknn", "protoknn")
    key = run_key(spec, settings, 1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert run_key(spec, settings, 1.0) != key
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(settings_module, "device_kind", lambda device: "cpu: another chip")
    assert run_key(spec, settings, 1.0) != key


# Every built-in head's defaults under its current revision: its constructor's default options
# and a digest of the phases (rates, schedules, pushes) and prototype layer they give. A default
# that changes results must come with a new Head.revision (the run key holds it), and then a
# new entry here.
PINNED_DEFAULTS = {
    "cnn": {"revision": 2, "phases": "3ef37ef1d745", "options": {
        "dim": 0, "num_prototypes": 0, "lr": 0.003, "warmup_epochs": 0.5, "schedule": "cosine", "weight_decay": 0.0}},
    "protoknn": {"revision": 1, "phases": "c2a4fa452945", "options": {
        "dim": 64, "num_prototypes": 100, "task_loss": "margin", "task_miner": "batch-hard", "aux_loss": "margin",
        "cluster_variant": "full", "cluster_reduction": "mean", "cluster_weight": 0.1, "aux_weight": 1.0, "tau": 0.05,
        "reg": 0.05, "margin": 0.2, "beta": 1.2, "cost_space": "unit", "ks": [1, 3, 5, 10], "k": 5, "memory": "full",
        "lr": 0.001, "beta_lr": 0.0005, "proxy_lr_scale": 100.0, "plan_cost": "gap", "tau_soft": 0.5,
        "straight_through": False, "frozen_prototypes": True, "prototype_lr": 0.001}},
    "protopnet": {"revision": 3, "phases": "6753ef0b1ce0", "options": {
        "dim": 64, "num_prototypes": 0, "prototypes_per_class": 10, "cluster_weight": 0.8, "separation_weight": 0.08,
        "l1_weight": 0.0001, "warm_epochs": 5, "push_every": 10, "push_start": 10, "last_layer_epochs": 20,
        "joint_step": [5, 0.1], "warm_lr": 0.003, "joint_backbone_lr": 0.0001, "scratch_backbone_lr": 0.001,
        "last_layer_lr": 0.0001, "weight_decay": 0.001, "prototype_init": "shifted-normal"}},
}


def head_defaults(name):
    import hashlib
    import inspect
    import json

    from protoknn_plugin.heads import get_head_class

    cls = get_head_class(name)
    options = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
               if p.default is not inspect.Parameter.empty}
    head = create_head(name, num_classes=10, backbone_channels=8, dim=8, num_prototypes=100)
    shapes = [[vars(p) for p in head.phases(30, pretrained, frozen_backbone=frozen)]
              for pretrained in (False, True) for frozen in (False, True)]
    spec = vars(head.prototype_spec()) if head.uses_prototypes else None
    digest = hashlib.sha256(json.dumps([shapes, spec], sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {"revision": cls.revision, "options": json.loads(json.dumps(options, default=str)), "phases": digest}


@pytest.mark.parametrize("name", sorted(PINNED_DEFAULTS))
def test_a_changed_default_needs_a_new_head_revision(name):
    current = head_defaults(name)
    pinned = PINNED_DEFAULTS[name]
    assert current["revision"] == pinned["revision"], (
        f"{name}: revision {current['revision']} is not pinned; pin its defaults: {current}")
    assert current == pinned, f"{name}: a default changed under revision {pinned['revision']}; bump the head's revision"


def test_lr_sweep_picks_on_validation_and_scores_the_test_set_only_for_the_choice(tmp_path):
    import json

    from conftest import TINY, run_cli

    result = run_cli("benchmark", "--heads", "cnn", *TINY, "--lr-scales", "0.5,1", "--seeds", "0,1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    chosen = data["meta"]["chosen"]["cnn"]
    assert set(chosen["val"]) == {"0.5", "1.0"} and chosen["lr_scale"] in (0.5, 1.0)
    best = max(chosen["val"].values())
    assert chosen["val"][str(float(chosen["lr_scale"]))] == best  # the best validation accuracy wins
    dirs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(dirs) == 3  # two sweep runs on seed 0 (one reused for the final table) + seed 1
    tested = [p for p in (tmp_path / "runs").iterdir() if (p / "metrics.json").exists()]
    assert len(tested) == 2 and all(r["lr_scale"] == chosen["lr_scale"] for r in data["runs"])


def test_step_time_is_the_median_over_feature_epochs_per_step():
    from types import SimpleNamespace

    from protoknn_plugin.benchmark.runner import _step_ms

    # 10 steps per epoch: 2 s, 4 s and 3 s epochs are 200, 400 and 300 ms a step; the median is 300.
    # Entries without epoch_seconds (none in practice, but a record must not break it) are ignored.
    history = [{"epoch_seconds": 2.0}, {"epoch_seconds": 4.0}, {"val_accuracy": 0.5}, {"epoch_seconds": 3.0}]
    assert _step_ms(SimpleNamespace(history=history), 10) == pytest.approx(300.0)
    assert _step_ms(SimpleNamespace(history=history[:2]), 10) == pytest.approx(300.0)  # even count: the mean of the middle two
    assert _step_ms(SimpleNamespace(history=[]), 10) is None


def test_projection_table_pairs_before_and_after_the_push_over_seeds():
    from protoknn_plugin.benchmark.projection import projection_fields, projection_lines

    pushes = {0: (0.70, 0.68), 1: (0.72, 0.71), 2: (0.74, 0.70)}  # seed: (before, after)
    runs = [{"label": "pk", "seed": seed, **projection_fields([
        {"cosine_mean": 0.5, "cosine_min": 0.1, "distinct_images": 9, "distinct_patches": 10,
         "val_accuracy_before": 0.0, "val_accuracy_after": 0.0},  # an earlier push: not the table's
        {"cosine_mean": 0.8 + 0.01 * seed, "cosine_min": 0.2, "distinct_images": 18 + seed, "distinct_patches": 20,
         "val_accuracy_before": before, "val_accuracy_after": after}])} for seed, (before, after) in pushes.items()]
    runs.append({"label": "cnn", "seed": 0})  # no push: no row
    header, rule, row = projection_lines(runs)
    # after - before: -2, -1, -4 points; mean -2.33, s = sqrt(7/3) = 1.528, t(2) = 4.303:
    # half-width 4.303 * 1.528 / sqrt(3) = 3.795 -> [-6.13, +1.46].
    assert row == "| pk | 3 | 0.810 | 0.200 | 19.0 | 20.0 | 72.00 | 69.67 | -2.33 | [-6.13, +1.46] |"
    assert len(runs[0]["pushes_measured"]) == 2
