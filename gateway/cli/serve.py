"""`gateway serve`."""

from __future__ import annotations

import asyncio

import click

from gateway.cli import main
from gateway.cli.common import Failure, config_option, db_option, load_config_or_fail
from gateway.errors import GatewayError
from gateway.logsetup import configure_logging

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
def serve(
    bind: str | None,
    port: int | None,
    db_path: str | None,
    config_path: str | None,
    log_level: str | None,
    log_format: str | None,
) -> None:
    """Run the gateway until SIGINT or SIGTERM (then finish in-flight commits, exit 0)."""
    from gateway.app import serve as serve_gateway

    config = load_config_or_fail(config_path)
    server = {k: v for k, v in {"bind": bind, "port": port}.items() if v is not None}
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
        asyncio.run(serve_gateway(config))
    except GatewayError as exc:
        raise Failure(str(exc)) from exc
    except OSError as exc:
        raise Failure(
            f"cannot listen on [{config.server.bind}]:{config.server.port}: {exc}"
        ) from exc
