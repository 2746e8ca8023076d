"""Checkpoints: plain data only, written atomically, loaded without running code.

A checkpoint holds tensors and plain Python types (dicts, lists, str, numbers); the run's
settings are one JSON string (``settings_json``). It is written to a temporary file beside
the target, fsynced, then renamed, so a crash or a full disk leaves the previous checkpoint
intact. It is read with ``torch.load(weights_only=True)``, which refuses any pickled object
that would run code when loaded.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable

import torch

from .errors import ProtoKNNError

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"  # the model at the best validation accuracy (runs with a validation split)
# A projecting head's best model before projection: more accurate at times, but its prototypes
# are no training patches, so it is loaded only when the user asks for it by name.
BEST_UNPROJECTED_NAME = "best-unprojected.pt"
# Keys of a checkpoint stored inside its JSON settings string rather than as pickled data.
SETTINGS_KEYS = ("model_config", "train_config", "dataset", "data", "classes", "format")
FORMAT = 2
# Fields that must match for --resume or for loading into a given model.
IDENTITY_FIELDS = ("head", "backbone", "num_prototypes", "dim", "num_classes", "in_channels")


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise a one-line error."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ProtoKNNError(
            f"output directory {str(out)!r} is not writable ({err.strerror or err}); pass --out to a directory you can write"
        ) from None
    return out


def save_atomic(state: Dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save ``state`` to ``path`` atomically (temp file + fsync + os.replace).

    A protoknn checkpoint (one with ``model_config``) gets its settings stored as JSON.
    """
    path = Path(path)
    if "model_config" in state:
        state = pack_settings(state)
    # Serialise in memory first: torch's writer turns a failed write (a full disk) into a
    # RuntimeError about stream positions; plain file writes give an honest OSError.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            full = err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            reason = "the disk is full" if full else (err.strerror or str(err))
            raise ProtoKNNError(
                f"could not write checkpoint {str(path)!r}: {reason}; the previous checkpoint is intact, free space and rerun with --resume"
            ) from None
        raise
    # Make the rename itself durable.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def pack_settings(state: Dict[str, Any]) -> Dict[str, Any]:
    """Move the settings of ``state`` into one JSON string: the config is JSON, not pickle."""
    settings = {k: state[k] for k in SETTINGS_KEYS if k in state}
    settings["format"] = FORMAT
    packed = {k: v for k, v in state.items() if k not in SETTINGS_KEYS}
    packed["settings_json"] = json.dumps(settings)
    return packed


def unpack_settings(state: Dict[str, Any]) -> Dict[str, Any]:
    settings = json.loads(state.pop("settings_json"))
    state.update(settings)
    return state


def checkpoint_path(path: str | os.PathLike, best: bool = False) -> Path:
    """The checkpoint file of a run directory (best.pt when ``best`` and it exists) or ``path`` itself."""
    path = Path(path)
    if path.is_dir():
        return path / BEST_NAME if best and (path / BEST_NAME).exists() else path / CHECKPOINT_NAME
    return path


def load_checkpoint(path: str | os.PathLike, best: bool = False) -> Dict[str, Any]:
    """Load a checkpoint file or a run directory's checkpoint, with one-line errors.

    ``best``: a run directory's best.pt when it has one (else its checkpoint.pt).
    """
    path = checkpoint_path(path, best)
    if not path.exists():
        raise ProtoKNNError(f"no checkpoint at {str(path)!r}; pass a run directory written by `protoknn train --out`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # objects beyond tensors and plain types: they could run code
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise ProtoKNNError(f"checkpoint {str(path)!r} holds pickled objects{what} that could run code; refusing to open it "
                            "(protoknn checkpoints hold only tensors and plain data; an older one must be retrained)") from None
    except Exception as err:  # a truncated or foreign file
        raise ProtoKNNError(f"checkpoint {str(path)!r} is unreadable ({type(err).__name__}); it is corrupt or not a protoknn checkpoint") from None
    if isinstance(state, dict) and isinstance(state.get("settings_json"), str):
        try:
            state = unpack_settings(state)
        except (ValueError, TypeError):
            raise ProtoKNNError(f"checkpoint {str(path)!r} has unreadable settings; it is corrupt") from None
    if not isinstance(state, dict) or "model_config" not in state:
        raise ProtoKNNError(f"{str(path)!r} is not a protoknn checkpoint (no model_config); pass a run directory written by `protoknn train`")
    return state


def check_run_dir(out: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an existing run without --resume/--overwrite, or to resume nothing."""
    out = Path(out)
    has = (out / CHECKPOINT_NAME).exists()
    if resume and overwrite:
        raise ProtoKNNError("--resume and --overwrite contradict each other; pass one of them")
    if has and not resume and not overwrite:
        raise ProtoKNNError(f"{str(out)!r} already holds a run (checkpoint.pt); continue it with --resume, "
                            "replace it with --overwrite, or pass another --out")
    if resume and not has:
        raise ProtoKNNError(f"--resume: {str(out)!r} holds no checkpoint.pt to continue; drop --resume to start a new run")


def check_compatible(saved: Dict[str, Any], wanted: Dict[str, Any], fields: Iterable[str] = IDENTITY_FIELDS) -> None:
    """Raise naming the first field where a saved model config differs from the wanted one."""
    for name in fields:
        if name in wanted and saved.get(name) != wanted.get(name):
            raise ProtoKNNError(
                f"checkpoint was made with {name}={saved.get(name)!r} but this run asks for {name}={wanted.get(name)!r}; "
                "use the same settings or a new --out directory"
            )
