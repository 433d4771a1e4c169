"""Command line of the device simulator."""

import click


@click.group()
def main() -> None:
    """Simulated fleets of constrained devices."""
