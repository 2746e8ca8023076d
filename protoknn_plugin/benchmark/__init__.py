"""Side-by-side comparisons under one protocol: every head (or cluster-loss variant) on the
same data, backbone initialisation and budget, over several seeds.

Modules: ``settings`` (rows and shared settings, run-directory names), ``protocol`` (the
budget and its checks), ``runner`` (one resumable run), ``comparison`` (sweep, seeds,
results), ``stats`` (t-intervals, paired differences), ``tables`` and ``charts`` (results.png, curves.png);
``tuning`` (``--tune``: an equal-budget Optuna search per row), ``plugin_backend`` (the
package's trainer as the default run backend, see ``run_backends``), ``executors`` (runs in this
process or as Ray tasks) and ``locking`` (one trainer per run directory).

Writes ``results.json`` (every run, the summary, the paired differences), ``results.csv``,
``results.md``, ``results.png``, ``curves.png``, and one directory per run under ``runs/``
so that ``protoknn explain`` and ``protoknn evaluate`` work on it afterwards.
"""
from .comparison import check_protocol, run_comparison
from .settings import BenchmarkSettings, RunSpec, run_dir_name, run_key
from .tables import summarise

__all__ = ["BenchmarkSettings", "RunSpec", "run_comparison", "check_protocol", "summarise",
           "run_key", "run_dir_name"]
