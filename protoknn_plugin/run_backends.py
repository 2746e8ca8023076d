"""Run backends: what trains a benchmark row, and on what terms.

A row of a comparison names a head (``protoknn``) or a row of another toolkit
(``cabrnet:protopnet``). Each row belongs to one backend, which computes its budget for the
protocol check, trains and scores its runs, and says which of the protocol's choices
(learning-rate scales, schedules, tuning) apply to it. The package's own trainer is the
backend ``plugin`` (registered by ``benchmark``) and takes every row no other backend claims.

Other backends register by name, in the style of timm's registry::

    @register_backend("mine")
    class MyBackend(RunBackend):
        prefix = "mine:"
        ...

or, from a package that is not imported first, through the entry-point group
``protoknn_plugin.run_backends`` (``mine = "my_package.backend:MyBackend"``). The benchmark
therefore knows no backend but its own by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from .registry import Registry

DEFAULT_BACKEND = "plugin"
RUN_BACKENDS: Registry = Registry("run backend", entry_point_group="protoknn_plugin.run_backends")


class RunBackend:
    """One way to train a benchmark row. Subclasses set ``prefix`` (the rows named
    ``PREFIX...`` are theirs) and implement ``budget`` and ``run``.

    ``lr_scales``, ``schedules``, ``tuning``: whether the sweep of learning-rate scales, the
    sweep of schedules and ``--tune`` apply to its rows (a backend that builds its own
    schedule runs each row once per seed at its own rates). ``explainable``: whether its runs
    can be read back by ``protoknn faithfulness``. ``reports_budget``: whether a run's record
    carries its budget; when not, the comparison adds the one ``budget`` computed.
    """

    name = ""
    prefix: Optional[str] = None
    lr_scales = schedules = tuning = True
    explainable = True
    reports_budget = True

    def owns(self, row: str) -> bool:
        """Whether the row named ``row`` belongs to this backend."""
        return self.prefix is not None and row.startswith(self.prefix)

    def check(self, row: str) -> None:
        """Fail fast, before any training, on a row this backend cannot run (an unknown name,
        a missing extra), with a one-line ``ProtoKNNError``."""

    def budget(self, spec: Any, settings: Any, splits: Any, pretrained: bool, steps_per_epoch: int) -> Dict[str, Any]:
        """The row's budget (``protocol.budget``'s fields) for the check before training."""
        raise NotImplementedError

    def run(self, spec: Any, seed: int, lr_scale: float, schedule: str, settings: Any, splits: Any,
            run_dir: Path, progress: bool = False, score: bool = False) -> Dict[str, Any]:
        """Train (or resume, or read) one run in ``run_dir`` and return its record; with
        ``score``, the record holds the test metrics too (``accuracy``, ``primary``)."""
        raise NotImplementedError


def register_backend(name: Optional[str] = None, *, overwrite: bool = False):
    """Class decorator: register a ``RunBackend`` subclass under ``name``."""
    def decorator(cls):
        cls.name = name or cls.name or cls.__name__
        return RUN_BACKENDS.register(cls.name, overwrite=overwrite)(cls)

    return decorator


def create_backend(name: str) -> RunBackend:
    """The backend registered as ``name`` (an unknown name: a one-line error listing the known)."""
    return RUN_BACKENDS.create(name)


def list_backends() -> List[str]:
    """The names of every registered backend, entry points included."""
    return RUN_BACKENDS.names()


def backend_for(row: str) -> RunBackend:
    """The backend whose rows include ``row``: the first other backend that claims it, else
    the default (the package's trainer, registered once ``benchmark`` is imported)."""
    for name in list_backends():
        if name != DEFAULT_BACKEND:
            backend = create_backend(name)
            if backend.owns(row):
                return backend
    return create_backend(DEFAULT_BACKEND)
