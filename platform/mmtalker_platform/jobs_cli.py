"""``mmtalker run`` and ``mmtalker submit``: a job spec run here or submitted to a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmtalker.eval.metrics import format_scores


def run_command(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML, e.g. jobs/train.yaml.")],
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", envvar="MMTALKER_VERBOSE",
            help="Show Ray's and the libraries' own logs here (else they go to a file).",
        ),
    ] = False,
) -> None:  # fmt: skip
    """Run a job spec on the current Ray cluster (RAY_ADDRESS, else a local one)."""
    from mmtalker_platform.animate_cli import run_batch
    from mmtalker_platform.cluster import session_logs
    from mmtalker_platform.console import route_logs
    from mmtalker_platform.redaction import redact_text
    from mmtalker_platform.settings import PlatformSettings
    from mmtalker_platform.spec import AnimateJobSpec, load_spec
    from mmtalker_platform.train import run_training

    job = load_spec(spec)
    settings = PlatformSettings(verbose=verbose)
    for field, location in job.outputs().items():
        if location is not None:
            settings.check_durable(location, field)
    logs = route_logs(settings, job.name)
    if logs is not None:
        typer.echo(f"logs         {logs} (--verbose shows them here)")
    if isinstance(job, AnimateJobSpec):
        run_batch(job)
        return
    outcome = run_training(job, settings)
    version = outcome.version
    typer.echo(
        f"run {outcome.run_id}: {outcome.epochs} epochs, {outcome.resumes} resumes; registered "
        f"{version.name} version {version.version} ({', '.join(version.aliases) or 'no alias'})"
    )
    scores = {k.removeprefix("test_"): v for k, v in outcome.test_metrics.items()}
    typer.echo(f"test  {format_scores(scores)}  (on {version.tested_on})")
    typer.echo(f"MLflow       {redact_text(outcome.tracking_uri)} (run {outcome.run_id})")
    typer.echo(f"model        {outcome.model} (--checkpoint of evaluate, render, animate)")
    typer.echo(f"Ray's logs   {session_logs()} (workers and actors)")


def submit_command(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML inside the current directory.")],
    address: Annotated[
        str | None,
        typer.Option(help="Ray Jobs API URL (default MMTALKER_RAY_DASHBOARD or local)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Stream logs until the job ends.")] = True,
) -> None:
    """Submit a job spec to a Ray cluster through the Jobs API; exit non-zero if it fails."""
    from mmtalker_platform.jobs import submit

    status = submit(spec, address, wait=wait, echo=typer.echo)
    typer.echo(status)
