"""Atomic checkpoints: write to a temporary file beside the target, fsync, then rename.

A crash or a full disk during the write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable

import torch

from .errors import ProtoKNNError

CHECKPOINT_NAME = "checkpoint.pt"
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
    """torch.save ``state`` to ``path`` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
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


def load_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Load a checkpoint file or a run directory's checkpoint, with one-line errors."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise ProtoKNNError(f"no checkpoint at {str(path)!r}; pass a run directory written by `protoknn train --out`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ProtoKNNError(f"checkpoint {str(path)!r} is unreadable ({type(err).__name__}); it is corrupt or not a protoknn checkpoint") from None
    if not isinstance(state, dict) or "model_config" not in state:
        raise ProtoKNNError(f"{str(path)!r} is not a protoknn checkpoint (no model_config); pass a run directory written by `protoknn train`")
    return state


def check_compatible(saved: Dict[str, Any], wanted: Dict[str, Any], fields: Iterable[str] = IDENTITY_FIELDS) -> None:
    """Raise naming the first field where a saved model config differs from the wanted one."""
    for name in fields:
        if name in wanted and saved.get(name) != wanted.get(name):
            raise ProtoKNNError(
                f"checkpoint was made with {name}={saved.get(name)!r} but this run asks for {name}={wanted.get(name)!r}; "
                "use the same settings or a new --out directory"
            )
