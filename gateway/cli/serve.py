"""`gateway serve`."""

from __future__ import annotations

import asyncio
import socket

import click

from gateway import eventloop
from gateway.cli import main
from gateway.cli.common import Failure, config_option, db_option, load_config_or_fail
from gateway.coap.steering import WorkerSeat
from gateway.config import check_config
from gateway.errors import ConfigError, GatewayError
from gateway.logsetup import configure_logging
from gateway.supervisor import follow_supervisor, supervise, worker_command

# --- serve --------------------------------------------------------------------------------


@main.command()
@click.option("--bind", help="Address to listen on; '::' is every IPv6 and IPv4 address.")
@click.option("--port", type=int, help="UDP port (default 5683).")
@db_option
@config_option
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log level."
)
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), help="Log rendering.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Worker processes on the port, about one per core (default server.workers, 1).",
)
@click.option(
    "--worker-seat", hidden=True, help="INDEX:COUNT:FD:SUPERVISOR, given by the supervisor."
)
def serve(
    bind: str | None,
    port: int | None,
    db_path: str | None,
    config_path: str | None,
    log_level: str | None,
    log_format: str | None,
    workers: int | None,
    worker_seat: str | None,
) -> None:
    """Run the gateway until SIGINT or SIGTERM (then finish in-flight commits, exit 0).

    With --workers N, N processes serve the port, each device always by the same one, and
    share the database; worker 0 also runs the relay and the rules (docs/deployment.md).
    """
    from gateway.app import serve as serve_gateway

    config = load_config_or_fail(config_path)
    server: dict[str, object] = {
        k: v for k, v in {"bind": bind, "port": port, "workers": workers}.items() if v is not None
    }
    if server:
        config = config.replace("server", **server)
    if db_path:
        config = config.replace("store", path=db_path)
    logging_changes = {
        k: v for k, v in {"level": log_level, "format": log_format}.items() if v is not None
    }
    if logging_changes:
        config = config.replace("logging", **logging_changes)
    configure_logging(config.logging.level, config.logging.format)
    try:
        check_config(config)
    except ConfigError as exc:
        raise Failure(str(exc)) from exc
    try:
        if worker_seat is not None:
            seat, supervisor = _seat(worker_seat)
            follow_supervisor(supervisor)
            eventloop.run(serve_gateway(config, seat=seat), config.server.event_loop)
        elif config.server.workers > 1:
            forwarded = _forwarded(
                bind=bind,
                port=port,
                db=db_path,
                config=config_path,
                log_level=log_level,
                log_format=log_format,
                workers=config.server.workers,
            )
            status = asyncio.run(supervise(config, worker_command(forwarded)))
            if status:
                raise Failure("a worker failed; see the log")
        else:
            eventloop.run(serve_gateway(config), config.server.event_loop)
    except GatewayError as exc:
        raise Failure(str(exc)) from exc
    except OSError as exc:
        raise Failure(
            f"cannot listen on [{config.server.bind}]:{config.server.port}: {exc}"
        ) from exc


def _forwarded(**options: object) -> list[str]:
    """The options a worker is started with: what this command was given."""
    args: list[str] = []
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def _seat(text: str) -> tuple[WorkerSeat, int]:
    """The seat and the supervisor's process id, from INDEX:COUNT:FD:SUPERVISOR."""
    try:
        index, count, fd, supervisor = (int(part) for part in text.split(":"))
    except ValueError:
        raise click.BadParameter(
            "expected INDEX:COUNT:FD:SUPERVISOR", param_hint="--worker-seat"
        ) from None
    return WorkerSeat(index, count, socket.socket(fileno=fd)), supervisor
