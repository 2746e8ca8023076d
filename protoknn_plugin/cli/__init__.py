"""The ``protoknn`` command line: one command per user task.

Every ProtoKNNError becomes one line on stderr and exit code 2; no traceback. Each
command lives in the module of its task (listing, training, comparing, explaining, reporting)
and registers itself on the ``cli`` group below.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import click

from .common import err_console


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="protoknn-plugin")
def cli():
    """protoknn: ProtoKNN and ProtoPNet heads on one prototype layer.

    Train, evaluate and compare heads side by side, and explain a prediction
    ("this looks like it rather than that").
    """



# Commands register themselves on ``cli`` when their module is imported.
from . import comparing, explaining, listing, predicting, reporting, training  # noqa: E402,F401
from .common import add_config_option  # noqa: E402

add_config_option(cli)  # --config FILE on every command, including those added later


def main(argv: Optional[List[str]] = None) -> None:
    import warnings

    from ..data.base import DatasetWarning

    warnings.filterwarnings("ignore", category=DatasetWarning)  # the CLI reports skipped images itself
    # Library warnings as one line each, like our errors.
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        cli.main(args=argv, prog_name="protoknn", standalone_mode=True)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
