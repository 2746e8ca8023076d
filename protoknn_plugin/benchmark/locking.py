"""One trainer per run directory, across processes and machines.

``run_lock`` holds an exclusive ``flock`` on ``RUN_DIR/run.lock`` while a run trains and
is scored. The kernel drops the lock when its process dies (a killed worker, a SIGKILL), so
the next process that takes the run finds the checkpoint and resumes it; a lock file left
behind by a dead process blocks nobody. Linux maps ``flock`` on NFS to byte-range locks
the server arbitrates, so the lock also holds between nodes that share ``--out``.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_NAME = "run.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the run directory's lock for the block; yields whether it is held.

    ``wait=False`` yields False at once when another process holds it. The lock belongs to
    this open file, so taking it twice in one process (nested) would wait forever: take it
    once per run, around training and scoring together.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

