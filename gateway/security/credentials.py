"""OSCORE credentials: generating them, keeping them in the store, writing a device's side.

The gateway's side of each security context lives in the `credentials` table (migration
0005); the device's side is written as an aiocoap credentials file plus an OSCORE context
directory. Every change bumps `credentials_version`, which the running gateway polls, so a
rotation or revocation made by `gateway devices ...` in another process takes effect within
`security.reload_interval`.

Secrets are never logged or printed. Files holding key material are created 0600 inside 0700
directories, and the database file is set to 0600 once it holds any.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from gateway.core.access import Identity, Role
from gateway.errors import GatewayError

#: AES-CCM-16-64-128 allows ids of up to 7 bytes; 6 random bytes make collisions unlikely
#: and the uniqueness constraint on recipient_id catches the rest.
ID_BYTES = 6
SECRET_BYTES = 32
SALT_BYTES = 8
KIND_OSCORE = "oscore"
#: DTLS 1.2 with a pre-shared key (needs the optional DTLSSocket package, docs/security.md).
KIND_DTLS = "dtls"
KINDS = (KIND_OSCORE, KIND_DTLS)


class CredentialError(GatewayError):
    """A credentials operation cannot be done (unknown name, already provisioned, ...)."""


@dataclass(frozen=True, slots=True)
class OscoreMaterial:
    """One OSCORE context, from the gateway's point of view."""

    sender_id: bytes
    recipient_id: bytes
    master_secret: bytes
    master_salt: bytes

    @classmethod
    def generate(cls) -> OscoreMaterial:
        sender = secrets.token_bytes(ID_BYTES)
        recipient = secrets.token_bytes(ID_BYTES)
        while recipient == sender:
            recipient = secrets.token_bytes(ID_BYTES)
        return cls(
            sender, recipient, secrets.token_bytes(SECRET_BYTES), secrets.token_bytes(SALT_BYTES)
        )

    def for_peer(self) -> OscoreMaterial:
        """The same context seen from the device: the ids swap."""
        return OscoreMaterial(
            self.recipient_id, self.sender_id, self.master_secret, self.master_salt
        )

    def __repr__(self) -> str:  # never let a secret reach a log line or a traceback
        return f"OscoreMaterial(sender_id={self.sender_id.hex()}, recipient_id=..., secret=***)"


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    identity: Identity
    generation: int
    #: For DTLS, `master_secret` is the pre-shared key and the ids are unused.
    material: OscoreMaterial
    kind: str = KIND_OSCORE

    @property
    def psk_identity(self) -> bytes:
        """The DTLS PSK identity the peer presents."""
        return self.identity.claim.encode("utf-8")

    @property
    def key(self) -> str:
        """Entry name in the live credentials map; changes with every rotation."""
        return f":{self.identity.claim}#{self.generation}"


# --- the store -------------------------------------------------------------------------------


async def credentials_version(conn: aiosqlite.Connection) -> int:
    async with conn.execute("SELECT version FROM credentials_version WHERE id = 1") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def active_credentials(conn: aiosqlite.Connection) -> list[CredentialRecord]:
    async with conn.execute(
        "SELECT role, name, generation, sender_id, recipient_id, master_secret, master_salt,"
        " kind FROM credentials WHERE revoked_at IS NULL",
    ) as cursor:
        rows = await cursor.fetchall()
    return [
        CredentialRecord(
            Identity(row[0], row[1]),
            int(row[2]),
            OscoreMaterial(bytes(row[3]), bytes(row[4]), bytes(row[5]), bytes(row[6])),
            str(row[7]),
        )
        for row in rows
        if row[7] in KINDS
    ]


async def _bump(conn: aiosqlite.Connection) -> None:
    await conn.execute("UPDATE credentials_version SET version = version + 1 WHERE id = 1")


async def _insert(
    conn: aiosqlite.Connection, identity: Identity, generation: int, now: float, kind: str
) -> OscoreMaterial:
    for _ in range(8):
        material = OscoreMaterial.generate()
        if kind == KIND_DTLS:
            # tinydtls takes pre-shared keys of at most 16 bytes (DTLS_PSK_MAX_KEY_LEN).
            material = OscoreMaterial(b"", material.recipient_id, material.master_secret[:16], b"")
        async with conn.execute(
            "SELECT 1 FROM credentials WHERE recipient_id = ?", (material.recipient_id,)
        ) as cursor:
            if await cursor.fetchone() is None:
                break
    else:  # pragma: no cover - 48 random bits colliding eight times in a row
        raise CredentialError("could not find a free recipient id")
    await conn.execute(
        "INSERT INTO credentials (name, role, kind, sender_id, recipient_id, master_secret,"
        " master_salt, generation, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            identity.name,
            identity.role,
            kind,
            material.sender_id,
            material.recipient_id,
            material.master_secret,
            material.master_salt,
            generation,
            now,
        ),
    )
    return material


async def _current(conn: aiosqlite.Connection, identity: Identity) -> tuple[int, bool, str] | None:
    async with conn.execute(
        "SELECT generation, revoked_at IS NOT NULL, kind FROM credentials"
        " WHERE role = ? AND name = ?",
        (identity.role, identity.name),
    ) as cursor:
        row = await cursor.fetchone()
    return None if row is None else (int(row[0]), bool(row[1]), str(row[2]))


async def provision(
    conn: aiosqlite.Connection, identity: Identity, *, now: float, kind: str = KIND_OSCORE
) -> CredentialRecord:
    """New credentials for a name that has none (a revoked name may be provisioned again)."""
    if kind not in KINDS:
        raise CredentialError(f"unknown credential kind {kind!r}")
    await conn.execute("BEGIN IMMEDIATE")
    try:
        current = await _current(conn, identity)
        if current is not None and not current[1]:
            raise CredentialError(
                f"{identity.role} {identity.name!r} already has credentials; use rotate-credentials"
            )
        generation = 1 if current is None else current[0] + 1
        await conn.execute(
            "DELETE FROM credentials WHERE role = ? AND name = ?", (identity.role, identity.name)
        )
        material = await _insert(conn, identity, generation, now, kind)
        await _bump(conn)
        await conn.execute("COMMIT")
    except BaseException:
        await conn.execute("ROLLBACK")
        raise
    return CredentialRecord(identity, generation, material, kind)


async def rotate(conn: aiosqlite.Connection, identity: Identity, *, now: float) -> CredentialRecord:
    """Replace the credentials of a provisioned name; the old ones stop working at once."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        current = await _current(conn, identity)
        if current is None or current[1]:
            raise CredentialError(f"{identity.role} {identity.name!r} has no active credentials")
        await conn.execute(
            "DELETE FROM credentials WHERE role = ? AND name = ?", (identity.role, identity.name)
        )
        material = await _insert(conn, identity, current[0] + 1, now, current[2])
        await _bump(conn)
        await conn.execute("COMMIT")
    except BaseException:
        await conn.execute("ROLLBACK")
        raise
    return CredentialRecord(identity, current[0] + 1, material, current[2])


async def revoke(conn: aiosqlite.Connection, identity: Identity, *, now: float) -> None:
    await conn.execute("BEGIN IMMEDIATE")
    try:
        current = await _current(conn, identity)
        if current is None or current[1]:
            raise CredentialError(f"{identity.role} {identity.name!r} has no active credentials")
        # The key material goes: a revoked credential is never needed again.
        await conn.execute(
            "UPDATE credentials SET revoked_at = ?, master_secret = x'', master_salt = x''"
            " WHERE role = ? AND name = ?",
            (now, identity.role, identity.name),
        )
        await _bump(conn)
        await conn.execute("COMMIT")
    except BaseException:
        await conn.execute("ROLLBACK")
        raise


def protect_database_file(path: str | Path) -> None:
    """0600 on the database and its WAL files: they now hold key material."""
    for suffix in ("", "-wal", "-shm"):
        candidate = Path(f"{path}{suffix}")
        if candidate.exists():
            candidate.chmod(0o600)


# --- files -----------------------------------------------------------------------------------


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _write_private(path: Path, data: dict[str, object]) -> None:
    """Write a JSON file created 0600 (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def write_context_dir(directory: Path, material: OscoreMaterial) -> None:
    """An aiocoap `FilesystemSecurityContext` directory; fresh sequence state."""
    _private_dir(directory)
    for stale in ("sequence.json", "lock"):
        (directory / stale).unlink(missing_ok=True)
    _write_private(
        directory / "settings.json",
        {
            "sender-id_hex": material.sender_id.hex(),
            "recipient-id_hex": material.recipient_id.hex(),
        },
    )
    _write_private(
        directory / "secret.json",
        {"secret_hex": material.master_secret.hex(), "salt_hex": material.master_salt.hex()},
    )


CREDENTIALS_FILE = "credentials.json"


def write_peer_credentials(
    out_dir: str | Path, record: CredentialRecord, *, uri_pattern: str = "coap://*"
) -> Path:
    """The device's (or operator's) side: `<out>/<name>/credentials.json` + `oscore/`.

    The JSON file is in aiocoap's credentials format, so `aiocoap-client --credentials` and
    `device-sim run --credentials` both load it. For DTLS it holds the pre-shared key and
    the PSK identity itself (`coaps://*`). Returns the credentials file's path.
    """
    base = Path(out_dir).absolute() / record.identity.name
    _private_dir(base)
    credentials_file = base / CREDENTIALS_FILE
    if record.kind == KIND_DTLS:
        if uri_pattern == "coap://*":
            uri_pattern = "coaps://*"
        _write_private(
            credentials_file,
            {
                uri_pattern: {
                    "dtls": {
                        "psk": {"hex": record.material.master_secret.hex()},
                        "client-identity": {"hex": record.psk_identity.hex()},
                    }
                }
            },
        )
        return credentials_file
    context_dir = base / "oscore"
    if context_dir.exists():
        shutil.rmtree(context_dir)
    write_context_dir(context_dir, record.material.for_peer())
    _write_private(credentials_file, {uri_pattern: {"oscore": {"basedir": f"{context_dir}/"}}})
    return credentials_file


def identity(name: str, role: Role = "device") -> Identity:
    return Identity(role, name)
