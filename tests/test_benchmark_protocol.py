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
    assert run_key(RunSpec("tesnet", "tesnet"), settings, 1.0) == "6da00cc3"
    # ProtoKNN's revision 2 (a pretrained-backbone default) retrains its runs, as it must.
    assert run_key(RunSpec("protoknn", "protoknn"), settings, 1.0) not in ("df08eb58", "6da00cc3")
    # The plain CNN's key changed on purpose with its revision 3 (the rate its validation sweep chose).
    assert run_key(RunSpec("cnn", "cnn"), settings, 1.0) == "dee698b0"


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
# new entry here. A new option whose default keeps the old behaviour (ProtoPNet's
# similarity="log", the prototype spec's parts=0 for plain prototypes) changes the digest here
# but not the results: it updates the pin, not the revision.
PINNED_DEFAULTS = {
    "cnn": {"revision": 3, "phases": "73277d3bfbe7", "options": {
        "dim": 0, "num_prototypes": 0, "lr": 0.09, "warmup_epochs": 0.5, "schedule": "cosine", "weight_decay": 0.0}},
    "protoknn": {"revision": 2, "phases": "7f657b6667ac", "pretrained_defaults": {"cluster_variant": "linear-assignment"},
                 "options": {
        "dim": 64, "num_prototypes": 100, "task_loss": "margin", "task_miner": "batch-hard", "aux_loss": "margin",
        "cluster_variant": "full", "cluster_reduction": "mean", "cluster_weight": 0.1, "aux_weight": 1.0, "tau": 0.05,
        "reg": 0.05, "margin": 0.2, "beta": 1.2, "cost_space": "unit", "ks": [1, 3, 5, 10], "k": 5, "memory": "full",
        "lr": 0.001, "beta_lr": 0.0005, "proxy_lr_scale": 100.0, "plan_cost": "gap", "tau_soft": 0.5,
        "straight_through": False, "frozen_prototypes": True, "prototype_lr": 0.001, "push_every": 0}},
    "protopnet": {"revision": 3, "phases": "ecf8efefc275", "options": {
        "dim": 64, "num_prototypes": 0, "prototypes_per_class": 10, "cluster_weight": 0.8, "separation_weight": 0.08,
        "l1_weight": 0.0001, "warm_epochs": 5, "push_every": 10, "push_start": 10, "last_layer_epochs": 20,
        "joint_step": [5, 0.1], "warm_lr": 0.003, "joint_backbone_lr": 0.0001, "scratch_backbone_lr": 0.001,
        "last_layer_lr": 0.0001, "weight_decay": 0.001, "prototype_init": "shifted-normal", "similarity": "log"}},
}


def head_defaults(name):
    import hashlib
    import json

    from protoknn_plugin.heads import get_head_class
    from protoknn_plugin.heads.options import option_defaults

    cls = get_head_class(name)
    options = option_defaults(cls)
    head = create_head(name, num_classes=10, backbone_channels=8, dim=8, num_prototypes=100)
    shapes = [[vars(p) for p in head.phases(30, pretrained, frozen_backbone=frozen)]
              for pretrained in (False, True) for frozen in (False, True)]
    spec = vars(head.prototype_spec()) if head.uses_prototypes else None
    digest = hashlib.sha256(json.dumps([shapes, spec], sort_keys=True, default=str).encode()).hexdigest()[:12]
    pinned = {"revision": cls.revision, "options": json.loads(json.dumps(options, default=str)), "phases": digest}
    if cls.pretrained_defaults:
        pinned["pretrained_defaults"] = dict(cls.pretrained_defaults)
    return pinned


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
    assert {(c["lr_scale"], c["schedule"]) for c in chosen["val"]} == {(0.5, "own"), (1.0, "own")}
    best = max(c["val_accuracy"] for c in chosen["val"])
    picked = [c for c in chosen["val"] if c["lr_scale"] == chosen["lr_scale"]]
    assert picked[0]["val_accuracy"] == best  # the best validation accuracy wins
    dirs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(dirs) == 3  # two sweep runs on seed 0 (one reused for the final table) + seed 1
    tested = [p for p in (tmp_path / "runs").iterdir() if (p / "metrics.json").exists()]
    assert len(tested) == 2 and all(r["lr_scale"] == chosen["lr_scale"] for r in data["runs"])
    assert all(r["schedule"] == "own" and r["prediction"] == "top1" for r in data["runs"])


def test_step_time_is_the_median_over_feature_epochs_per_step():
    from types import SimpleNamespace

    from protoknn_plugin.benchmark.runner import _step_ms

    # 10 steps per epoch: 2 s, 4 s and 3 s epochs are 200, 400 and 300 ms a step; the median is 300.
    # Entries without epoch_seconds (none in practice, but a record must not break it) are ignored.
    history = [{"epoch_seconds": 2.0}, {"epoch_seconds": 4.0}, {"val_accuracy": 0.5}, {"epoch_seconds": 3.0}]
    assert _step_ms(SimpleNamespace(history=history), 10) == pytest.approx(300.0)
    assert _step_ms(SimpleNamespace(history=history[:2]), 10) == pytest.approx(300.0)  # even count: the mean of the middle two
    assert _step_ms(SimpleNamespace(history=[]), 10) is None


def test_cosine_schedule_decays_every_phase_and_restarts_after_each_push():
    from protoknn_plugin.benchmark.protocol import with_schedule

    # ProtoPNet over 25 epochs from scratch: joint cycles to the pushes at 10 and 20 and the end,
    # which share one Adam and one StepLR under its own schedule.
    own = _phases("protopnet", 25, pretrained=False)
    assert [p.name for p in own] == ["joint", "last-layer"] * 3 and own[0].optimizer_key == "joint"
    assert with_schedule(own, "own") == own
    cosine = with_schedule(own, "cosine")
    assert [(p.name, p.epochs, p.lrs, p.after) for p in cosine] == [(p.name, p.epochs, p.lrs, p.after) for p in own]
    joint = [p for p in cosine if p.name == "joint"]
    assert all(p.schedule_name == "cosine" and p.warmup_epochs == 0.5 and p.optimizer_key is None for p in joint)
    # The last layer trains on cached profiles, where no scheduler steps: it keeps its constant rate.
    assert [p for p in cosine if p.name == "last-layer"] == [p for p in own if p.name == "last-layer"]
    # The plain CNN's own schedule is the swept cosine: one setting, not two.
    cnn = _phases("cnn", 4, pretrained=False)
    assert with_schedule(cnn, "cosine") == cnn
    with pytest.raises(ProtoKNNError, match="unknown schedule 'linear'"):
        with_schedule(own, "linear")


def test_the_head_s_own_schedule_keeps_its_run_key_and_cosine_gets_its_own(monkeypatch):
    monkeypatch.setattr(settings_module, "machine_identity", lambda device: dict(PINNED_MACHINE))
    settings = BenchmarkSettings(train=TrainConfig(epochs=4, val_fraction=0.1))
    spec = RunSpec("tesnet", "tesnet")
    assert run_key(spec, settings, 1.0, "own") == run_key(spec, settings, 1.0) == "6da00cc3"  # the pinned key
    assert run_key(spec, settings, 1.0, "cosine") != run_key(spec, settings, 1.0)
    swept = BenchmarkSettings(train=TrainConfig(epochs=4, val_fraction=0.1), schedules=("own", "cosine"))
    assert run_key(spec, swept, 1.0) == "6da00cc3"  # what is swept does not name a run, what it chose does


def test_the_prediction_is_chosen_on_validation_with_ties_to_the_head_s_own():
    from protoknn_plugin.benchmark.comparison import choose_prediction

    def record(k1, k3, k5):
        return {"val_accuracy": k5, "val_accuracy[k=1]": k1, "val_accuracy[k=3]": k3, "val_accuracy[k=5]": k5}

    # means k=1 0.80, k=3 0.85, k=5 0.84: k=3 wins although the head's own is k=5.
    name, means = choose_prediction([record(0.8, 0.9, 0.88), record(0.8, 0.8, 0.8)], "k=5")
    assert name == "k=3" and means == pytest.approx({"k=1": 0.8, "k=3": 0.85, "k=5": 0.84})
    assert choose_prediction([record(0.8, 0.9, 0.9)], "k=5")[0] == "k=5"  # a tie goes to the head's own
    assert choose_prediction([record(0.9, 0.9, 0.8)], "k=5")[0] == "k=1"  # else to the smaller k
    assert choose_prediction([{"val_accuracy": None}], "k=5") == ("k=5", {})  # no validation split


def test_schedule_sweep_and_k_are_chosen_on_validation(tmp_path):
    import json

    from conftest import TINY, run_cli

    result = run_cli("benchmark", "--heads", "protoknn,cnn", *TINY, "--schedules", "own,cosine", "--seeds", "0",
                     "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    pk, cnn = data["meta"]["chosen"]["protoknn"], data["meta"]["chosen"]["cnn"]
    assert [c["schedule"] for c in pk["val"]] == ["own", "cosine"]
    best = max(pk["val"], key=lambda c: c["val_accuracy"])
    assert pk["schedule"] == best["schedule"] or pk["val"][0]["val_accuracy"] == pk["val"][1]["val_accuracy"]
    assert cnn["val"] == [] and cnn["schedule"] == "own"  # its own schedule is the cosine: nothing to sweep
    assert len(list((tmp_path / "runs").iterdir())) == 3  # protoknn twice, cnn once
    (run,) = [r for r in data["runs"] if r["label"] == "protoknn"]
    assert pk["prediction"] == max(pk["val_by_prediction"], key=lambda k: (pk["val_by_prediction"][k], k == "k=5"))
    assert run["prediction"] == pk["prediction"] and run["accuracy"] == run[f"accuracy[{pk['prediction']}]"]
    assert f"protoknn x1 {pk['schedule']} {pk['prediction']}" in (tmp_path / "results.md").read_text()


def test_benchmarks_on_the_feature_cache_default_to_five_seeds(monkeypatch):
    from click.testing import CliRunner

    from protoknn_plugin.cli import cli, comparing

    seen = {}
    monkeypatch.setattr(comparing, "_run_interruptibly", lambda specs, settings, *a, **k: seen.update(s=settings))
    for args, seeds in ((["--frozen-backbone"], [0, 1, 2, 3, 4]), ([], [0, 1, 2]),
                        (["--frozen-backbone", "--seeds", "7"], [7])):
        result = CliRunner().invoke(cli, ["benchmark", *args])
        assert result.exit_code == 0, result.output
        assert list(seen["s"].seeds) == seeds


def test_an_unknown_schedule_is_a_one_line_error(tmp_path):
    from conftest import TINY, assert_one_line_error, run_cli

    result = run_cli("benchmark", "--heads", "cnn", *TINY, "--schedules", "own,linear", "--out", tmp_path)
    assert_one_line_error(result, "--schedules", "own,cosine")
    assert result.returncode == 2


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
