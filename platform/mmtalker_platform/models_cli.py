"""``mmtalker models``: list, show and promote registered model versions (MLflow registry)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from mmtalker.eval.metrics import REPORTED

if TYPE_CHECKING:
    from mmtalker_platform.registry import ModelVersionInfo

models_app = typer.Typer(
    help="List, inspect and promote registered model versions.", no_args_is_help=True
)
#: Metrics in the table, scaled like the field's tables (vertices in metres).
COLUMNS = ("lve", "fdd", "mve", "eve")

TrackingUri = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the work folder)."),
]
Ref = Annotated[str, typer.Argument(help="NAME (latest version), NAME@ALIAS or NAME/VERSION.")]


def _uri(tracking_uri: str | None) -> str:
    from mmtalker_platform.settings import PlatformSettings

    return tracking_uri or PlatformSettings().tracking_uri


def _table(infos: list[ModelVersionInfo]) -> str:
    header = [
        "name", "version", "aliases", *(REPORTED[k][0] for k in COLUMNS), "tested on", "run",
        "created",
    ]  # fmt: skip
    rows = [
        [
            info.name,
            str(info.version),
            ",".join(info.aliases) or "-",
            *(
                f"{info.metrics[k] * REPORTED[k][1]:.3f}" if k in info.metrics else "-"
                for k in COLUMNS
            ),
            str(info.tested_on or "-"),
            (info.run_id or "-")[:8],
            info.created.astimezone().strftime("%Y-%m-%d %H:%M"),
        ]
        for info in infos
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = range(3, 3 + len(COLUMNS))
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    )


@models_app.command("list")
def list_command(
    name: Annotated[str | None, typer.Argument(help="Registered model (default: all).")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """List model versions, newest first: aliases, test metrics and the test set they were
    measured on (dataset name @ fingerprint; champion only moves within one)."""
    from mmtalker_platform.registry import list_versions

    uri = _uri(tracking_uri)
    infos = list_versions(uri, name)
    typer.echo(_table(infos) if infos else f"no registered model versions in {uri}")


@models_app.command("show")
def show_command(ref: Ref, tracking_uri: TrackingUri = None) -> None:
    """Show the version a reference resolves to, with its run and artifact location."""
    from mmtalker_platform.registry import show

    info = show(_uri(tracking_uri), ref)
    typer.echo(f"{_table([info])}\nrun     {info.run_id or '-'}\nsource  {info.source}")


@models_app.command("promote")
def promote_command(
    ref: Ref,
    alias: Annotated[str, typer.Option(help="Alias to point at the version.")] = "champion",
    tracking_uri: TrackingUri = None,
) -> None:
    """Point an alias (default: champion) at a version, whatever its metrics."""
    from mmtalker_platform.registry import promote

    info = promote(_uri(tracking_uri), ref, alias)
    typer.echo(f"{info.name}@{alias} -> version {info.version}\n{_table([info])}")
