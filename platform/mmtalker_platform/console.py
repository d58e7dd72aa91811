"""What a person sees while a job runs: a line per stage and per epoch, the results, where the
outputs are. Ray's and the libraries' own logs go to a file whose path is printed; ``--verbose``
(or ``MMTALKER_VERBOSE=1``) leaves them on the terminal.

Commands call :func:`route_logs` once, after their imports and before they start Ray, and
report progress with :func:`stage`; :func:`mmtalker_platform.cluster.connect` keeps the
cluster's workers' output off the terminal unless the settings say verbose.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import ray.data
import typer

from mmtalker_platform.settings import PlatformSettings


def route_logs(settings: PlatformSettings, name: str) -> Path | None:
    """Unless verbose: Python logging, warnings and whatever native code writes to file
    descriptor 2 go to ``WORK/logs/NAME-TIME.log`` instead of the terminal, and Ray Data's and
    MLflow's progress bars are off; returns the file (None when verbose)."""
    if settings.verbose:
        return None
    folder = settings.work_dir.resolve() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{datetime.now():%Y%m%d-%H%M%S}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    # Libraries (Ray, Ray Data, MLflow) attach their own terminal handlers at import time.
    for logger in loggers:
        console = [h for h in logger.handlers if _is_terminal(h)]
        for old in console:
            logger.removeHandler(old)
        if console or logger is logging.getLogger():
            logger.addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    logging.captureWarnings(True)
    # Ray's C++ core runs in this process too and writes its errors straight to file
    # descriptor 2 (a Ray Data actor pool always draws one about restarting actors). That
    # descriptor goes to the log; Python's stderr (errors, progress bars) keeps the terminal.
    sys.stderr.flush()
    terminal = os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding="utf-8", errors="replace")
    ray.data.DataContext.get_current().enable_progress_bars = False
    # MLflow reads it at each download: no bar per registry model an animation job loads.
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return path


def _is_terminal(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


@contextmanager
def stage(message: str) -> Iterator[None]:
    """One line for a stage of work: ``message ... 12 s`` (or ``... failed``)."""
    started = time.perf_counter()
    typer.echo(f"{message} ...", nl=False)
    try:
        yield
    except BaseException:
        typer.echo(" failed")
        raise
    typer.echo(f" {time.perf_counter() - started:.0f} s")
