"""Operator commands: parse flags, call the app or the store, print.

Tables for people, `--json` for scripts. Exit codes: 0 done, 1 failed (the error is printed),
2 usage error, 3 the named thing does not exist. Each command group lives in its own module
and registers itself on `main` when imported below.
"""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """CoAP gateway for constrained devices: serve, and inspect what it stored."""


# Imported for their side effect of adding commands to `main`.
from gateway.cli import (  # noqa: E402, F401
    alerts,
    commands,
    config_check,
    devices,
    readings,
    relay,
    security,
    serve,
)
