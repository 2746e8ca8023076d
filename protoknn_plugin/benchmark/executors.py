"""Where a comparison's runs execute: in this process (the default), or as Ray tasks that
spread over the machines of a cluster (``--executor ray``, extra ``protoknn-plugin[cluster]``).

A job is one run (train or resume it, then score the test split when asked) or one tuning
trial (benchmark.tuning). Every job holds its run directory's lock (benchmark.locking) while
it works, so a finished run is read, never trained again, and two processes never train the
same run: two benchmark commands on the same ``--out``, or Ray workers on a shared ``--out``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import ProtoKNNError
from ..run_backends import backend_for
from . import plugin_backend  # noqa: F401  (registers the default backend)
from .locking import run_lock
from .settings import BenchmarkSettings, RunSpec

EXECUTORS = ("in-process", "ray")
DONE_NOTE = " (done, read from metrics.json)"


@dataclass
class RunJob:
    """Train (or resume, or read) one run; with ``score``, also score its test split once."""

    spec: RunSpec
    seed: int
    lr_scale: float
    run_dir: Path
    score: bool = False
    title: str = ""
    schedule: str = "own"

    def note(self) -> str:
        """What the progress line adds: a finished run is only read."""
        return DONE_NOTE if self.score and (Path(self.run_dir) / "metrics.json").exists() else ""

    def execute(self, settings: BenchmarkSettings, splits, progress: bool = False,
                wait: bool = True) -> Optional[Dict[str, Any]]:
        """The run's record (with test metrics when ``score``); None when ``wait`` is False and
        another process holds the run."""
        run_dir = Path(self.run_dir)
        with run_lock(run_dir, wait=wait) as held:
            if not held:
                return None
            return backend_for(self.spec.head).run(self.spec, self.seed, self.lr_scale, self.schedule, settings,
                                                   splits, run_dir, progress, score=self.score)


class InProcessExecutor:
    """Runs the jobs one after another in this process.

    A job whose run another process holds (a second benchmark on the same ``--out``) is put
    off and taken after the others, by when it is usually finished and only read.
    """

    name = "in-process"

    def __init__(self, say: Optional[Callable[[str], None]] = None, progress: bool = False):
        self.say, self.progress = say or (lambda text: None), progress

    def map(self, jobs: Sequence[Any], settings: BenchmarkSettings, splits) -> List[Any]:
        results: List[Any] = [None] * len(jobs)
        later = []
        for index, job in enumerate(jobs):
            self.say(job.title + job.note())
            result = job.execute(settings, splits, self.progress, wait=False)
            if result is None:
                self.say(f"{job.title}: another process holds this run; back to it after the others")
                later.append(index)
            else:
                results[index] = result
        for index in later:
            self.say(jobs[index].title + " (waiting for the other process)")
            results[index] = jobs[index].execute(settings, splits, self.progress, wait=True)
        return results

    def close(self) -> None:
        """Nothing to release."""


def run_in_worker(job, settings: BenchmarkSettings, splits, threads: Optional[int]):
    """One job inside a Ray worker: the same thread count as an in-process run, then the job."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return job.execute(settings, splits, progress=False, wait=True)


class RayExecutor:
    """Runs each job as a Ray task with ``cpus`` CPUs and ``gpus`` GPUs, all at once, as the
    cluster's free resources allow. ``address``: ``auto``, ``HOST:PORT`` of a head node, or None
    for a local Ray instance of ``local_cpus`` CPUs on the machine that runs the command.

    The splits go to the object store once; every worker trains on the very data this process
    loaded. A task whose worker dies is retried (``retries``) and resumes from the checkpoint.
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, cpus: float = 1, gpus: float = 0,
                 threads: Optional[int] = None, local_cpus: Optional[int] = None,
                 say: Optional[Callable[[str], None]] = None, retries: int = 3):
        from ..extras import require_extra

        ray = require_extra("ray", "cluster", "--executor ray")
        self.ray, self.say = ray, say or (lambda text: None)
        self.threads = threads if threads else max(1, int(cpus))
        if not ray.is_initialized():
            options = {"num_cpus": local_cpus} if address is None and local_cpus else {}
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, **options)
            except ConnectionError as err:
                raise ProtoKNNError(f"--executor ray cannot reach the Ray cluster at {address!r} ({err}); "
                                    "start it with `ray start --head` or leave out --address for a local one") from None
        self.task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=retries)(run_in_worker)
        self._splits: Dict[int, Any] = {}

    def map(self, jobs: Sequence[Any], settings: BenchmarkSettings, splits) -> List[Any]:
        key = id(splits)
        if key not in self._splits:
            self._splits = {key: self.ray.put(splits)}
        refs = []
        for job in jobs:
            self.say(job.title + job.note() + " (Ray task)")
            refs.append(self.task.remote(job, settings, self._splits[key], self.threads))
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as err:
            # The worker's own error (a bad option: one line; an interruption), not Ray's wrapper.
            cause = getattr(err, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise

    def close(self) -> None:
        self._splits = {}


def create_executor(name: str, address: Optional[str] = None, cpus: float = 1, gpus: float = 0,
                    threads: Optional[int] = None, local_cpus: Optional[int] = None,
                    say: Optional[Callable[[str], None]] = None, progress: bool = False):
    """``in-process`` (no Ray import) or ``ray``."""
    if name == "in-process":
        if address is not None:
            raise ProtoKNNError("--address names a Ray cluster; add --executor ray, or leave --address out")
        return InProcessExecutor(say, progress)
    if name == "ray":
        return RayExecutor(address, cpus, gpus, threads, local_cpus, say)
    raise ProtoKNNError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")
