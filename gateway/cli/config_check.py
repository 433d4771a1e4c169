"""`gateway config check`."""

from __future__ import annotations

import sys
from dataclasses import asdict

import click

from gateway.cli import main
from gateway.cli.common import EXIT_FAILED, Failure, json_option, print_json
from gateway.config import load_config
from gateway.errors import ConfigError

# --- config -------------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Check configuration files."""


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
def config_check(file: str, as_json: bool) -> None:
    """Validate FILE (with environment overrides); print the effective configuration."""
    try:
        loaded = load_config(file)
    except ConfigError as exc:
        if as_json:
            print_json({"valid": False, "error": str(exc), "key": exc.key})
            sys.exit(EXIT_FAILED)
        raise Failure(str(exc)) from exc
    if as_json:
        print_json({"valid": True, "config": asdict(loaded)})
        return
    click.echo(f"{file}: valid")
    for section, values in asdict(loaded).items():
        click.echo(f"[{section}]")
        if isinstance(values, dict):
            for key, value in values.items():
                click.echo(f"  {key} = {value!r}")
        else:
            click.echo(f"  {values!r}")
