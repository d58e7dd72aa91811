"""The ``mmtalker`` command: the library's and the platform's commands behind one error boundary."""

from __future__ import annotations

import sys

import typer

from mmtalker.cli.data import data_app, run
from mmtalker.cli.model import evaluate_command, train
from mmtalker.cli.render import render_command
from mmtalker_platform.animate_cli import animate_command
from mmtalker_platform.jobs_cli import run_command, submit_command
from mmtalker_platform.models_cli import models_app
from mmtalker_platform.serve_cli import serve_command

app = typer.Typer(
    help="MMTalker: speech-driven 3D facial animation, trained and served at scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
app.command("train")(train)
app.command("evaluate")(evaluate_command)
app.command("animate")(animate_command)
app.command("render")(render_command)
app.add_typer(models_app, name="models")
app.command("run")(run_command)
app.command("submit")(submit_command)
app.command("serve")(serve_command)


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(app))


if __name__ == "__main__":
    main()
