"""`gateway devices add|rotate-credentials|revoke` and `gateway operators ...`.

These write the store directly (the gateway may be running: SQLite's WAL lets both write),
then bump the credentials version the gateway polls, so the change is live within
`security.reload_interval`. Key material is written to files only, never printed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, TypeVar

import aiosqlite
import click

from gateway.cli import main
from gateway.cli.common import (
    EXIT_NOT_FOUND,
    Failure,
    config_option,
    db_option,
    json_option,
    print_json,
    resolve_db_path,
    run_async,
)
from gateway.cli.devices import devices
from gateway.core.access import Identity
from gateway.core.registration import GENERIC_TYPE
from gateway.security import credentials
from gateway.store.db import migrate, open_database

T = TypeVar("T")

DEFAULT_OUT = "var/credentials"

out_option = click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=DEFAULT_OUT,
    show_default=True,
    help="Where the peer's credentials go: OUT/NAME/credentials.json (0600) and OUT/NAME/oscore/.",
)
pattern_option = click.option(
    "--uri-pattern",
    default="coap://*",
    show_default=True,
    help="Requests to URIs matching this pattern use the credentials.",
)


class NoCredentials(click.ClickException):
    exit_code = EXIT_NOT_FOUND


async def _with_writer(path: str, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
    conn = await open_database(path)
    try:
        await migrate(conn)
        result = await work(conn)
    finally:
        await conn.close()
    credentials.protect_database_file(path)
    return result


def _issue(
    db: str,
    identity: Identity,
    out_dir: str,
    pattern: str,
    *,
    rotate: bool,
    device_type: str | None = None,
    kind: str = credentials.KIND_OSCORE,
) -> Path:
    async def work(conn: aiosqlite.Connection) -> credentials.CredentialRecord:
        if device_type is not None:
            await conn.execute(
                "INSERT INTO devices (name, type, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO NOTHING",
                (identity.name, device_type, time.time()),
            )
        if rotate:
            return await credentials.rotate(conn, identity, now=time.time())
        return await credentials.provision(conn, identity, now=time.time(), kind=kind)

    try:
        record = run_async(_with_writer(db, work))
    except Failure as exc:
        if "no active credentials" in exc.message:
            raise NoCredentials(exc.message) from exc
        raise
    return credentials.write_peer_credentials(out_dir, record, uri_pattern=pattern)


def _report(identity: Identity, path: Path | None, action: str, as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "role": identity.role,
                "name": identity.name,
                "action": action,
                "credentials": str(path) if path else None,
            }
        )
    elif path is not None:
        click.echo(f"{identity.role} {identity.name}: {action}; credentials in {path}")
    else:
        click.echo(f"{identity.role} {identity.name}: {action}")


def _revoke(db: str, identity: Identity) -> None:
    async def work(conn: aiosqlite.Connection) -> None:
        await credentials.revoke(conn, identity, now=time.time())

    try:
        run_async(_with_writer(db, work))
    except Failure as exc:
        raise NoCredentials(exc.message) from exc


# --- devices ---------------------------------------------------------------------------------


@devices.command("add")
@click.argument("name")
@click.option("--type", "device_type", default=GENERIC_TYPE, show_default=True)
@click.option(
    "--credentials",
    "kind",
    type=click.Choice(["oscore", "dtls", "none"]),
    default="none",
    show_default=True,
    help="Generate an OSCORE security context, or a DTLS pre-shared key, for the device.",
)
@out_option
@pattern_option
@db_option
@config_option
@json_option
def devices_add(
    name: str,
    device_type: str,
    kind: str,
    out_dir: str,
    uri_pattern: str,
    db_path: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Add a device, optionally with credentials (the device's side goes to --out)."""
    db = resolve_db_path(config_path, db_path)
    identity = Identity("device", name)
    if kind == "none":

        async def work(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT INTO devices (name, type, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO NOTHING",
                (name, device_type, time.time()),
            )

        run_async(_with_writer(db, work))
        _report(identity, None, "added", as_json)
        return
    path = _issue(
        db, identity, out_dir, uri_pattern, rotate=False, device_type=device_type, kind=kind
    )
    _report(identity, path, "added", as_json)


# --- operators -------------------------------------------------------------------------------


@main.group()
def operators() -> None:
    """Operator credentials: needed for commands and admin resources in authenticated mode."""


@operators.command("add")
@click.argument("name")
@out_option
@pattern_option
@db_option
@config_option
@json_option
def operators_add(
    name: str,
    out_dir: str,
    uri_pattern: str,
    db_path: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """OSCORE credentials for operator NAME (the operator's side goes to --out)."""
    identity = Identity("operator", name)
    path = _issue(
        resolve_db_path(config_path, db_path), identity, out_dir, uri_pattern, rotate=False
    )
    _report(identity, path, "added", as_json)


def add_rotate_and_revoke(group: click.Group, role: Literal["device", "operator"]) -> None:
    """`rotate-credentials NAME` and `revoke NAME`, the same for devices and operators."""
    who = "NAME" if role == "device" else "operator NAME"

    @group.command(
        "rotate-credentials",
        help=f"New credentials for {who}; the old ones stop working within a second.",
    )
    @click.argument("name")
    @out_option
    @pattern_option
    @db_option
    @config_option
    @json_option
    def rotate(
        name: str,
        out_dir: str,
        uri_pattern: str,
        db_path: str | None,
        config_path: str | None,
        as_json: bool,
    ) -> None:
        identity = Identity(role, name)
        path = _issue(
            resolve_db_path(config_path, db_path), identity, out_dir, uri_pattern, rotate=True
        )
        _report(identity, path, "rotated", as_json)

    @group.command(
        "revoke", help=f"Revoke {who}'s credentials; its requests are refused within a second."
    )
    @click.argument("name")
    @db_option
    @config_option
    @json_option
    def revoke(name: str, db_path: str | None, config_path: str | None, as_json: bool) -> None:
        identity = Identity(role, name)
        _revoke(resolve_db_path(config_path, db_path), identity)
        _report(identity, None, "revoked", as_json)


add_rotate_and_revoke(devices, "device")
add_rotate_and_revoke(operators, "operator")
