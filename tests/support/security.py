"""Provisioning credentials the way `gateway devices add --credentials oscore` does.

`provision_device` writes through its own database connection, as the CLI in another process
would, so the running gateway must pick the change up by polling.
"""

from __future__ import annotations

import time
from pathlib import Path

from gateway.core.access import Identity, Role
from gateway.security import credentials
from gateway.store.db import migrate, open_database


async def provision(
    db_path: str,
    name: str,
    out_dir: Path,
    *,
    role: Role = "device",
    rotate: bool = False,
    kind: str = credentials.KIND_OSCORE,
) -> Path:
    """Credentials for `name`; returns the peer's credentials file."""
    conn = await open_database(db_path)
    try:
        await migrate(conn)
        identity = Identity(role, name)
        if rotate:
            record = await credentials.rotate(conn, identity, now=time.time())
        else:
            record = await credentials.provision(conn, identity, now=time.time(), kind=kind)
    finally:
        await conn.close()
    return credentials.write_peer_credentials(out_dir, record)


async def revoke(db_path: str, name: str, *, role: Role = "device") -> None:
    conn = await open_database(db_path)
    try:
        await credentials.revoke(conn, Identity(role, name), now=time.time())
    finally:
        await conn.close()
