"""``mmtalker serve``: run the Serve application of ``jobs/serve.yaml`` on this Ray cluster."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from mmtalker.errors import MMTalkerError

APP_NAME = "mmtalker"


class Stopped(Exception):
    """SIGTERM asked the server to stop (what Kubernetes and systemd send)."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def read_serve_config(path: Path) -> dict[str, Any]:
    """The ``args`` of the ``mmtalker`` application in a Serve config file (``serve deploy``)."""
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise MMTalkerError(f"cannot read Serve config {path}: {exc}") from exc
    for application in data.get("applications", []) if isinstance(data, dict) else []:
        if application.get("name") == APP_NAME:
            return dict(application.get("args") or {})
    raise MMTalkerError(f"{path} has no application named {APP_NAME!r} under 'applications'")


def serve_command(
    config: Annotated[Path, typer.Option(help="Serve config YAML.")] = Path("jobs/serve.yaml"),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    model: Annotated[str | None, typer.Option(help="Registered model (overrides config).")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint folder (overrides config).")
    ] = None,
) -> None:
    """Serve online animation and catalog jobs over HTTP until stopped (Ctrl-C, SIGTERM)."""
    import ray
    from ray import serve

    from mmtalker_platform.cluster import connect
    from mmtalker_platform.serve import ServeConfig, build_app
    from mmtalker_platform.settings import PlatformSettings

    args = read_serve_config(config)
    if checkpoint is not None:
        args = {**{k: v for k, v in args.items() if k != "model"}, "checkpoint": str(checkpoint)}
    elif model is not None:
        args = {**{k: v for k, v in args.items() if k != "checkpoint"}, "model": model}
    try:
        settings = ServeConfig.model_validate(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "args"
        raise MMTalkerError(f"{config}: {where}: {first['msg']}") from exc
    connect(PlatformSettings())
    # Installed after Ray's own handler, which exits at once: Serve and the local Ray this
    # command started would be left behind (an orphaned dashboard agent keeps its port, and
    # the next Ray on the machine refuses every job). SIGTERM now stops as Ctrl-C does.
    signal.signal(signal.SIGTERM, _stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        typer.echo(f"serving {APP_NAME} on http://{host}:{port} (POST /v1/animate, /v1/jobs)")
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=True)
    except Stopped as stop:
        typer.echo(f"{stop}: stopping {APP_NAME}")
    finally:
        # Stopping takes seconds; a second SIGTERM must not cut it short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        serve.shutdown()
        ray.shutdown()
