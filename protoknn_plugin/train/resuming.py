"""Resume means the same run: every setting that changes the results must match the checkpoint.

``check_same_run`` compares a checkpoint with the model, training and data settings of the
command that wants to continue it, and refuses the first difference in one line naming the
setting and both values. The epoch count is the one setting that may change, and only
upwards: ``continue_plan`` moves the saved progress onto the longer plan, or refuses when the
head's phase plan changes in a way that the trained part cannot follow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import ProtoKNNError
from ..heads.base import Phase
from .state import TrainState

# Checkpoint field -> the option that sets it. Settings absent here (device, workers, threads,
# tensorboard, the data folder's location) do not change what the run computes.
MODEL_SETTINGS = {"head": "--head", "backbone": "--backbone", "num_prototypes": "--prototypes", "dim": "--dim",
                  "weights": "--weights", "backbone_options": "--backbone-opt", "seed": "--seed",
                  "num_classes": "the data's classes", "in_channels": "the data's channels"}
TRAIN_SETTINGS = {"batch_classes": "--batch-classes", "per_class": "--per-class",
                  "steps_per_epoch": "--steps-per-epoch", "seed": "--seed", "deterministic": "--deterministic",
                  "val_fraction": "--val-fraction", "precision": "--precision"}
DATA_SETTINGS = {"limit": "--limit", "crop": "--crop", "image_size": "--image-size",
                 "frozen_backbone": "--frozen-backbone"}
# Head options with an option of their own on `protoknn train`; the rest come from --head-opt.
HEAD_OPTION_FLAGS = {"task_loss": "--task-loss", "aux_loss": "--aux-loss", "cluster_variant": "--cluster-variant",
                     "cluster_reduction": "--cluster-reduction", "memory": "--memory", "k": "--k"}
_FIX = "resume with the saved value, or start a new run with --overwrite or another --out"


def _refuse(field: str, flag: str, saved: Any, wanted: Any) -> None:
    raise ProtoKNNError(f"checkpoint was made with {field}={saved!r} but this run asks for {field}={wanted!r} "
                        f"({flag}); {_FIX}")


def _compare(saved: Dict[str, Any], wanted: Dict[str, Any], fields: Dict[str, str]) -> None:
    for field, flag in fields.items():
        if field in saved and field in wanted and _plain(saved[field]) != _plain(wanted[field]):
            _refuse(field, flag, saved[field], wanted[field])


def _plain(value: Any) -> Any:
    """Tuples and lists compare alike (a checkpoint's JSON has no tuples); 0.0 == 0."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _compare_head_options(saved: Dict[str, Any], wanted: Dict[str, Any], head: str) -> None:
    for key in sorted(set(saved) | set(wanted)):
        if _plain(saved.get(key)) != _plain(wanted.get(key)):
            flag = HEAD_OPTION_FLAGS.get(key, f"--head-opt {head}.{key}")
            _refuse(f"head_options.{key}", flag, saved.get(key), wanted.get(key))


def check_same_run(saved: Dict[str, Any], model_config: Dict[str, Any], train_config: Dict[str, Any],
                   dataset: str, data_info: Dict[str, Any], classes: Sequence[str]) -> None:
    """Refuse (one line) when ``saved`` (a loaded checkpoint) was made with other settings than these.

    The epoch count is checked apart (``check_epochs``): it may grow."""
    if saved.get("dataset") and dataset and saved["dataset"] != dataset:
        _refuse("dataset", "--dataset", saved["dataset"], dataset)
    saved_model = saved["model_config"]
    _compare(saved_model, model_config, MODEL_SETTINGS)
    _compare_head_options(saved_model.get("head_options") or {}, model_config.get("head_options") or {},
                          model_config.get("head", ""))
    _compare(saved.get("train_config") or {}, train_config, TRAIN_SETTINGS)
    saved_data = dict(saved.get("data") or {})
    saved_data.setdefault("frozen_backbone", False)
    _compare(saved_data, data_info, DATA_SETTINGS)
    if saved.get("classes") and list(saved["classes"]) != list(classes):
        raise ProtoKNNError(f"checkpoint was made on classes {_few(saved['classes'])} but the data now has "
                            f"{_few(classes)}; point --data-dir at the run's data, or start a new run with "
                            "--overwrite or another --out")


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(str(n)) for n in list(names)[:3])
    return f"[{shown}{', ...' if len(names) > 3 else ''}] ({len(names)})"


def saved_state(saved: Dict[str, Any], where: str) -> TrainState:
    """The checkpoint's TrainState, or the one-line corrupt-checkpoint error."""
    state = saved.get("train_state")
    try:
        if not isinstance(state, dict):
            raise TypeError("no train_state")
        return TrainState(**state)
    except TypeError as err:
        raise ProtoKNNError(f"checkpoint {where!r} is corrupt or incompatible (train_state: {err}); "
                            "retrain it or pass a run directory written by `protoknn train`") from None


def check_epochs(saved_epochs: int, epochs: int) -> None:
    if epochs < saved_epochs:
        raise ProtoKNNError(f"checkpoint was made with epochs={saved_epochs} but this run asks for epochs={epochs} "
                            f"(--epochs); --resume can add epochs but not remove them; resume with --epochs "
                            f"{saved_epochs} or more, or start a new run with --overwrite or another --out")


def _grows_only(old: Phase, new: Phase) -> bool:
    return new.epochs >= old.epochs and dataclasses.replace(old, epochs=new.epochs) == new


def continue_plan(state: TrainState, old: List[Phase], new: List[Phase],
                  epochs: Tuple[int, int] = (0, 0)) -> Tuple[TrainState, Optional[str]]:
    """``state`` (progress on the phase plan ``old``) moved onto the plan ``new`` of a larger
    epoch count (``epochs``: the saved and the new --epochs, for the messages), and a line saying what will happen; refuses when the trained part differs.

    A finished run whose last phase only grows goes back into that phase after its last epoch
    (with a fresh optimiser: a finished run keeps none) and runs the phase's end again."""
    if old == new:
        return state, None
    first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    last = len(old) - 1
    total_old, total_new = epochs
    same_shape = len(old) == len(new)
    if state.complete and same_shape and first == last and _grows_only(old[last], new[last]):
        phase = new[last]
        ends = f", then {' and '.join(phase.after)} again" if phase.after else ""
        moved = dataclasses.replace(state, phase=last, epoch=old[last].epochs, step=0, batches=None,
                                    epoch_sums={}, complete=False)
        return moved, (f"resuming a finished run: training on from epoch {total_old} to {total_new} "
                       f"(phase {phase.name!r}, fresh optimiser){ends}")
    if not state.complete and (state.phase < first or (
            state.phase == first and same_shape and _grows_only(old[first], new[first]))):
        return state, f"resuming with more epochs: {total_old} -> {total_new}, from where the run stopped"
    raise ProtoKNNError(f"--epochs {total_new}: this head's phase plan for {total_new} epochs differs from the "
                        f"{total_old}-epoch plan in the part already trained; keep --epochs {total_old}, or start a "
                        "new run with --overwrite or another --out")


def resume_progress(saved: Dict[str, Any], model, config, phases: List[Phase],
                    where: str) -> Tuple[TrainState, Optional[str]]:
    """The checkpoint's progress on the phase plan ``phases`` of ``config`` (which may hold more
    epochs than the saved run) and a line saying so; refuses a plan the trained part cannot follow."""
    state = saved_state(saved, where)
    saved_epochs = int((saved.get("train_config") or {}).get("epochs", config.epochs))
    check_epochs(saved_epochs, config.epochs)
    old = model.head.phases(saved_epochs, model.pretrained_backbone)
    return continue_plan(state, old, phases, (saved_epochs, config.epochs))
