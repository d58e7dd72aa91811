"""The ``mmtalker`` command: the library's and the platform's commands behind one error boundary."""

from __future__ import annotations

import sys

import typer

from mmtalker.cli import data_app, run

app = typer.Typer(
    help="MMTalker: speech-driven 3D facial animation, trained and served at scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(app))
