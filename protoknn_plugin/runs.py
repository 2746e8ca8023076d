"""One home for a run directory: building a run to train, and loading a finished one.

A run directory holds ``checkpoint.pt`` (and ``best.pt``, ``best-unprojected.pt`` with a
validation split), ``config.yaml``, ``metrics.csv`` and ``metrics.json``. Training (the
``train`` command and the benchmark) builds its model and Trainer with ``build_run``;
every reader of a finished run (explain, prototypes, report, faithfulness, evaluate, predict)
loads it here, so that readers of the same kind refuse an unfinished or unfit run in the same words.

This module sits above ``train``/``explain`` and below ``faithfulness``, ``benchmark``,
``report`` and ``cli``. Heavy imports happen inside the functions, so that importing it
(for a command's ``--help``) stays cheap.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .errors import ProtoKNNError

Say = Optional[Callable[[str], None]]


# --------------------------------------------------------------------------- finished runs

@dataclass
class LoadedRun:
    """A finished run: its model (eval mode, on the GPU if there is one), its checkpoint's plain
    data (``saved``) and the data splits it was trained on, rebuilt."""

    model: Any
    saved: Dict[str, Any]
    splits: Any


def check_run(run_dir) -> Dict[str, Any]:
    """The checkpoint of a finished run whose head has prototypes, or a one-line error.

    Only reads the checkpoint: bad requests fail before the (slow) model is built.
    """
    from .checkpoint import checkpoint_path, load_checkpoint, require_run_parts
    from .heads import get_head_class

    saved = require_run_parts(load_checkpoint(run_dir), checkpoint_path(run_dir))
    head = str((saved.get("model_config") or {}).get("head"))
    if not get_head_class(head).uses_prototypes:
        raise ProtoKNNError(f"run {str(run_dir)!r} uses head {head!r}, which has no prototypes, so it cannot be "
                            "explained; train a protoknn or protopnet head to get explanations")
    if not (saved.get("train_state") or {}).get("complete"):
        raise ProtoKNNError(f"run {str(run_dir)!r} has not finished training; continue it with "
                            "`protoknn train ... --resume`")
    return saved


def load_model(run_dir, choice: str = "best", say: Say = None):
    """The run's model (``train.load_trained_model``: projected unless ``choice`` is
    ``unprojected``) in eval mode on the GPU if there is one; ``say`` gets its one-line note.
    ``model.checkpoint_file`` names the file it came from (kept with results measured on it)."""
    import torch

    from .explain import check_explainable
    from .train import load_trained_model

    loaded = load_trained_model(run_dir, choice)
    if loaded.note and say is not None:
        say(loaded.note)
    check_explainable(loaded.model)
    loaded.model.checkpoint_file = loaded.file
    return loaded.model.eval().to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def run_splits(saved: Dict[str, Any], data_dir=None):
    """The run's dataset as it was trained (folder, limit, crop, image size); ``data_dir`` overrides its folder."""
    from .data.catalog import rebuild_run_data

    return rebuild_run_data(saved["dataset"], saved.get("data") or {}, data_dir)


def load_run(run_dir, data_dir=None, choice: str = "best", say: Say = None) -> LoadedRun:
    """A finished run with prototypes, for explain, prototypes, report and faithfulness: its checkpoint
    is checked first (``check_run``), then its data is rebuilt, then its model loaded (``load_model``)."""
    saved = check_run(run_dir)
    splits = run_splits(saved, data_dir)
    return LoadedRun(load_model(run_dir, choice, say), saved, splits)


def load_finished_run(run_dir, choice: str, data_dir=None, image_size=None, say: Say = None):
    """``(model, saved, splits, file)`` of a run that finished training, any head, for evaluate and predict.

    The model is ``train.load_trained_model(run_dir, choice)``'s (best.pt when the run has one,
    never an un-projected model unless ``choice`` is ``unprojected``; its note goes to ``say``);
    the data is the run's dataset as it was trained (folder, limit, crop, image size) unless overridden.
    """
    from .checkpoint import checkpoint_path, load_checkpoint, require_run_parts
    from .data.catalog import rebuild_run_data
    from .train import load_trained_model

    if not require_run_parts(load_checkpoint(run_dir), checkpoint_path(run_dir))["train_state"].get("complete"):
        raise ProtoKNNError(f"run {run_dir!r} has not finished training; "
                            "continue it with `protoknn train ... --resume`")
    loaded = load_trained_model(run_dir, choice)
    if loaded.note and say is not None:
        say(loaded.note)
    saved = loaded.saved
    splits = rebuild_run_data(saved["dataset"], saved.get("data") or {}, data_dir, image_size, augment=True)
    return loaded.model, saved, splits, loaded.file


# --------------------------------------------------------------------------- runs to train

@dataclass
class NewRun:
    """A run ready to train: its Trainer, the model and splits it was built with (``splits`` are the
    cached backbone maps when ``frozen``), and ``frozen``, the ``frozen.FrozenBackbone`` or None."""

    trainer: Any
    model: Any
    splits: Any
    frozen: Any = None

    def frozen_backbone(self):
        """The mode the run trains and is scored in: backbone maps from the cache when frozen, else images."""
        return self.frozen.frozen_backbone() if self.frozen is not None else contextlib.nullcontext()


def build_run(splits, train_config, model_options: Dict[str, Any], *, dataset_name: str, data_info: Dict[str, Any],
              out_dir=None, prepare: Optional[Callable[[Any, Any], Any]] = None,
              phases: Optional[Callable[[Any], Any]] = None, **trainer_options) -> NewRun:
    """The model and Trainer of one run, as ``protoknn train`` and the benchmark build them.

    ``model_options``: ``ModelConfig`` fields (head, backbone, num_prototypes, dim, weights,
    head_options, backbone_options), sized for ``splits``; the model's seed is ``train_config.seed``,
    so every head compared under one seed starts from the same backbone initialisation.
    ``prepare(model, splits)``: the steps that need the model before its Trainer (checks, a feature
    cache); it returns a ``frozen.FrozenBackbone`` to train on its cached maps, or None.
    ``data_info``: how to rebuild the data later (``Trainer``), the cache's facts added when frozen.
    ``phases(model)``: the phases to train (e.g. the benchmark's scaled rates and schedule); None:
    the head's own.
    ``trainer_options``: the rest of ``Trainer``'s keywords (progress, stage_eval, on_epoch, ...).
    """
    from .model import ModelConfig, PrototypeModel
    from .train import Trainer

    model = PrototypeModel(ModelConfig.for_data(splits, seed=train_config.seed, **model_options))
    frozen = prepare(model, splits) if prepare is not None else None
    if frozen is not None:
        splits, data_info = frozen.splits, {**data_info, **frozen.info}
    if phases is not None:
        trainer_options["phases"] = phases(model)
    trainer = Trainer(model, splits, train_config, out_dir=str(out_dir) if out_dir else None,
                      dataset_name=dataset_name, data_info=data_info, **trainer_options)
    return NewRun(trainer, model, splits, frozen)


def open_run_dir(out, resume: bool, overwrite: bool) -> Optional[Dict[str, Any]]:
    """The checkpoint to continue (``resume``), else None; refuses to train over a run without
    ``resume``/``overwrite``, or to resume nothing (``checkpoint.check_run_dir``). Reads only."""
    from .checkpoint import check_run_dir, checkpoint_path, load_checkpoint, require_run_parts

    check_run_dir(out, resume, overwrite)
    return require_run_parts(load_checkpoint(out), checkpoint_path(out)) if resume else None


def check_resume(saved: Dict[str, Any], out, model, train_config, dataset: str, data_info: Dict[str, Any],
                 splits) -> None:
    """Refuse to resume with settings that change the results, or a checkpoint that does not fit ``model``."""
    from .checkpoint import CHECKPOINT_NAME
    from .train import load_model_state
    from .train.resuming import check_same_run

    check_same_run(saved, model.config.to_dict(), asdict(train_config), dataset, data_info,
                   list(getattr(splits, "classes", [])))
    load_model_state(model, saved, str(Path(out) / CHECKPOINT_NAME))  # the trainer loads it again
