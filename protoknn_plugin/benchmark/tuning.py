"""Equal-budget tuning, ``protoknn benchmark --tune N``: every row gets N trials of Optuna's
TPE sampler on the validation split, each trial one run with the same budget as the
comparison's runs, pruned by validation accuracy after each epoch by the same pruner.

The studies live in ``OUT/tuning.db`` (SQLite), one per row, named by the row's label and
run key: an interrupted tuning resumes (the trial in flight is taken up again with the same
settings, and its run directory resumes from its checkpoint), and a rerun reuses every
finished trial. Only this process touches the database: a trial executed elsewhere (a Ray
worker) gets a copy of its row's finished trials and asks Optuna's pruner on that copy.

The chosen settings are written to results.md before any seed runs; the test split is
read only after that, by the comparison's scoring.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import ProtoKNNError
from ..heads.space import Choice, FloatRange, IntRange, SearchSpace
from .locking import run_lock
from .runner import train_run
from .settings import BenchmarkSettings, RunSpec, run_dir_name, run_key

TUNING_DB = "tuning.db"
PRUNED_NAME = "pruned.json"
# MedianPruner: no pruning among the first trials of a row, nor after its first epoch.
PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS = 3, 1


def optuna_module():
    from ..extras import require_extra

    optuna = require_extra("optuna", "tune", "--tune")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    return optuna


def tpe_startup_trials(trials: int) -> int:
    """Random trials before TPE models the rest: a third of the budget, 2 to 10."""
    return min(10, max(2, trials // 3))


def distributions(space: SearchSpace) -> Dict[str, Any]:
    """The space as Optuna distributions."""
    optuna = optuna_module()
    out = {}
    for name, rng in space.items():
        if isinstance(rng, FloatRange):
            out[name] = optuna.distributions.FloatDistribution(rng.low, rng.high, log=rng.log)
        elif isinstance(rng, IntRange):
            out[name] = optuna.distributions.IntDistribution(rng.low, rng.high, log=rng.log)
        elif isinstance(rng, Choice):
            out[name] = optuna.distributions.CategoricalDistribution(rng.choices)
        else:
            raise ProtoKNNError(f"search space option {name!r} has an unknown range {rng!r}")
    return out


def row_space(spec: RunSpec, pretrained: bool) -> SearchSpace:
    """The head's search space less the options the user fixed with --head-opt."""
    from ..heads import get_head_class
    from ..heads.options import check_keys

    space = get_head_class(spec.head).search_space(pretrained)
    check_keys(spec.head, space)  # a head must declare ranges of its own options
    return {name: rng for name, rng in space.items() if name not in spec.head_options}


def validation_curve(history: Sequence[Dict[str, Any]]) -> List[float]:
    """Validation accuracy after each feature epoch, in order."""
    return [float(h["val_accuracy"]) for h in history if h.get("val_accuracy") is not None]


class TrialPruned(Exception):
    """The pruner stopped the trial; ``curve`` is its validation accuracy so far."""

    def __init__(self, curve: List[float]):
        super().__init__(f"pruned after epoch {len(curve)}")
        self.curve = curve


@dataclass
class TrialJob:
    """One trial: one run of the row with the trial's options, seed ``seed``, no test split.

    ``finished``: the row's finished trials as plain data (params, state, value, curve), so
    that the pruning check needs no database.
    """

    spec: RunSpec
    seed: int
    run_dir: Path
    params: Dict[str, Any]
    space: SearchSpace
    epochs: int
    finished: List[Dict[str, Any]] = field(default_factory=list)
    title: str = ""

    def note(self) -> str:
        done = (Path(self.run_dir) / "run.json").exists() or (Path(self.run_dir) / PRUNED_NAME).exists()
        return " (done, read from its run directory)" if done else ""

    def execute(self, settings: BenchmarkSettings, splits, progress: bool = False,
                wait: bool = True) -> Optional[Dict[str, Any]]:
        """``{"state": "complete" | "pruned", "value", "curve"}``; None when another process holds it."""
        run_dir = Path(self.run_dir)
        with run_lock(run_dir, wait=wait) as held:
            if not held:
                return None
            if (run_dir / PRUNED_NAME).exists():
                return json.loads((run_dir / PRUNED_NAME).read_text())
            try:
                record, _ = train_run(self.spec, self.seed, 1.0, settings, splits, run_dir, progress,
                                      on_epoch=self._prune_check)
            except TrialPruned as pruned:
                result = {"state": "pruned", "value": None, "curve": pruned.curve}
                (run_dir / PRUNED_NAME).write_text(json.dumps(result))
                return result
        return {"state": "complete", "value": record["val_accuracy"], "curve": validation_curve(record["history"])}

    def _prune_check(self, history: Sequence[Dict[str, Any]]) -> None:
        curve = validation_curve(history)
        if curve and len(curve) < self.epochs and self.should_prune(curve):  # the last epoch always finishes
            raise TrialPruned(curve)

    def should_prune(self, curve: List[float]) -> bool:
        """Optuna's pruner on an in-memory copy of the row's finished trials plus this one."""
        optuna = optuna_module()
        dists = distributions(self.space)
        study = optuna.create_study(direction="maximize", pruner=make_pruner(optuna),
                                    sampler=optuna.samplers.RandomSampler(seed=0))
        for done in self.finished:
            study.add_trial(optuna.trial.create_trial(
                state=optuna.trial.TrialState[done["state"].upper()], value=done["value"], params=done["params"],
                distributions=dists, intermediate_values=dict(enumerate(done["curve"], 1))))
        study.enqueue_trial(self.params)
        trial = study.ask(dists)
        for step, value in enumerate(curve, 1):
            trial.report(value, step)
        return trial.should_prune()


def make_pruner(optuna):
    """The one pruner every row gets."""
    # Steps are epochs counted from 1, and Optuna prunes from step n_warmup_steps on.
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS + 1)


class TunedRow:
    """One row's study: asks for the next trial, records its result, names the choice."""

    def __init__(self, optuna, spec: RunSpec, space: SearchSpace, settings: BenchmarkSettings, storage,
                 runs_dir: Path, trials: int, seed: int):
        self.optuna, self.spec, self.space, self.settings = optuna, spec, space, settings
        self.runs_dir, self.trials, self.seed = runs_dir, trials, seed
        self.name = f"{spec.label}-{run_key(spec, settings, 1.0)}"
        self.dists = distributions(space)
        self.study = optuna.create_study(study_name=self.name, storage=storage, direction="maximize",
                                         load_if_exists=True)

    def finished(self) -> list:
        states = (self.optuna.trial.TrialState.COMPLETE, self.optuna.trial.TrialState.PRUNED)
        return [t for t in self.study.get_trials(deepcopy=False) if t.state in states]

    def next_trial(self):
        """A trial left running by an interrupted command first (same settings, so its run
        directory resumes), else a new one from TPE seeded by the count of finished trials,
        so that a resumed tuning asks what an uninterrupted one would."""
        for stale in self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.RUNNING,)):
            self.study.tell(stale.number, state=self.optuna.trial.TrialState.FAIL)
            self.study.enqueue_trial(stale.params)
        done = len(self.finished())
        self.study.sampler = self.optuna.samplers.TPESampler(seed=self.seed * 10007 + done,
                                                             n_startup_trials=tpe_startup_trials(self.trials))
        return self.study.ask(self.dists)

    def job(self, trial) -> TrialJob:
        spec = RunSpec(self.spec.label, self.spec.head, {**self.spec.head_options, **trial.params})
        finished = [{"params": t.params, "state": t.state.name.lower(), "value": t.value,
                     "curve": [t.intermediate_values[s] for s in sorted(t.intermediate_values)]}
                    for t in self.finished()]
        number = len(finished) + 1
        return TrialJob(spec, self.seed, self.runs_dir / run_dir_name(spec, self.settings, 1.0, self.seed),
                        dict(trial.params), self.space, self.settings.train.epochs, finished,
                        title=f"[bold]{self.spec.label}[/] trial {number}/{self.trials} seed {self.seed}")

    def tell(self, trial, result: Dict[str, Any]) -> None:
        for step, value in enumerate(result["curve"], 1):
            trial.report(value, step)
        if result["state"] == "pruned":
            self.study.tell(trial, state=self.optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, result["value"])

    def choice(self) -> Dict[str, Any]:
        finished = self.finished()
        complete = [t for t in finished if t.state == self.optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise ProtoKNNError(f"every trial of row {self.spec.label!r} was pruned; raise --tune")
        best = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earlier trial
        # Counted among finished trials: a trial taken up again after an interruption keeps its place.
        return {"params": dict(best.params), "val_accuracy": best.value, "trial": finished.index(best) + 1,
                "trials": len(finished), "pruned": len(finished) - len(complete)}


def tune_rows(specs: Sequence[RunSpec], settings: BenchmarkSettings, splits, out_dir: Path, runs_dir: Path,
              executor, trials: int, pretrained: bool,
              say: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, Any]]:
    """Tune every row with ``trials`` trials; returns label -> choice (params, val accuracy,
    trial counts). Rows with nothing to tune get empty params. The rows take turns, one trial
    each per round, so an executor with several workers runs a round's trials at once."""
    optuna = optuna_module()
    if getattr(splits, "val", None) is None:
        raise ProtoKNNError("--tune picks on a validation split; set --val-fraction above 0")
    seed = settings.sweep_seed_list()[0]
    storage = optuna.storages.RDBStorage(f"sqlite:///{(Path(out_dir) / TUNING_DB).resolve()}",
                                         engine_kwargs={"connect_args": {"timeout": 60}})
    rows, chosen = [], {}
    for spec in specs:
        space = row_space(spec, pretrained)
        if space:
            rows.append(TunedRow(optuna, spec, space, settings, storage, runs_dir, trials, seed))
        else:
            chosen[spec.label] = {"params": {}, "val_accuracy": None, "trial": None, "trials": 0, "pruned": 0}
    with contextlib.ExitStack() as held:
        for row in rows:  # one tuner per study: a second command on the same --out waits here
            held.enter_context(run_lock(Path(out_dir) / "tuning" / row.name))
        while True:
            batch = [(row, row.next_trial()) for row in rows if len(row.finished()) < trials]
            if not batch:
                break
            results = executor.map([row.job(trial) for row, trial in batch], settings, splits)
            for (row, trial), result in zip(batch, results):
                row.tell(trial, result)
                if say is not None:
                    shown = "pruned" if result["state"] == "pruned" else f"val {100 * result['value']:.1f}%"
                    say(f"[bold]{row.spec.label}[/] trial {len(row.finished())}/{trials}: {shown}")
    chosen.update({row.spec.label: row.choice() for row in rows})
    return chosen


def tuned_specs(specs: Sequence[RunSpec], chosen: Dict[str, Dict[str, Any]]) -> List[RunSpec]:
    """Every row with its chosen options (the user's fixed options stay)."""
    return [RunSpec(s.label, s.head, {**s.head_options, **chosen.get(s.label, {}).get("params", {})}) for s in specs]


def tuning_lines(chosen: Dict[str, Dict[str, Any]], trials: int, seed: int) -> List[str]:
    """The results.md section that names every row's chosen settings."""
    lines = ["## Tuning (chosen on the validation split before any test score)", "",
             f"Every row: {trials} trials of Optuna's TPE sampler (seed {seed}, the first "
             f"{tpe_startup_trials(trials)} random), each one run of seed {seed} with the comparison's budget, "
             f"pruned by validation accuracy after each epoch (median pruner: none among the first "
             f"{PRUNER_STARTUP_TRIALS} trials, nor after epoch {PRUNER_WARMUP_EPOCHS}, nor after the last).", "",
             "| row | trials | pruned | best val acc % | chosen settings |", "|---|---|---|---|---|"]
    for label, c in chosen.items():
        value = "" if c["val_accuracy"] is None else f"{100 * c['val_accuracy']:.2f}"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in c["params"].items())
        lines.append(f"| {label} | {c['trials']} | {c['pruned']} | {value} | {params or 'nothing to tune'} |")
    return lines


def write_tuning_section(out_dir: Path, chosen: Dict[str, Dict[str, Any]], trials: int, seed: int,
                         append: bool = False) -> None:
    """results.md with the chosen settings: alone before the seeds run, appended to the tables after."""
    path = Path(out_dir) / "results.md"
    text = "\n".join(tuning_lines(chosen, trials, seed)) + "\n"
    if append and path.exists():
        text = path.read_text() + "\n" + text
    path.write_text(text)
