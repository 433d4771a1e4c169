"""The live OSCORE credentials of the running gateway, kept in step with the store.

`SecurityContexts` owns aiocoap's `CredentialsMap` that the OSCORE site wrapper consults for
every protected request. A named task polls `credentials_version` every
`security.reload_interval` seconds; when it moved, the active rows are read again and the map
is changed in place: new or rotated contexts are added, revoked or rotated-away ones removed
(their lock released, their directory deleted). A request that arrives after the removal
finds no context and is answered 4.01 by the wrapper.

Each context is materialised as a `FilesystemSecurityContext` directory under
`contexts_dir` (0700, secrets 0600): aiocoap persists sequence numbers and the replay window
there, so a restarted gateway neither reuses a nonce nor accepts a replayed message.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite
import structlog
from aiocoap.credentials import DTLS, CredentialsMap
from aiocoap.oscore import FilesystemSecurityContext

from gateway.security.credentials import (
    KIND_DTLS,
    CredentialRecord,
    active_credentials,
    credentials_version,
    write_context_dir,
)

log = structlog.get_logger(__name__)


class LiveCredentials(CredentialsMap):  # type: ignore[misc]
    """The credentials map, truthy even while empty.

    aiocoap's `Context` takes `server_credentials or CredentialsMap()`; an empty map would be
    swapped for a fresh one and later additions never seen by the DTLS transport.
    """

    def __bool__(self) -> bool:
        return True


class SecurityContexts:
    def __init__(
        self, reader: aiosqlite.Connection, contexts_dir: str | Path, *, interval: float = 0.5
    ) -> None:
        self._reader = reader
        self._dir = Path(contexts_dir)
        self._interval = interval
        self.credentials = LiveCredentials()
        self._loaded: dict[str, Any] = {}
        self._version: int | None = None
        self._task: asyncio.Task[None] | None = None
        #: Names of devices holding active credentials (a provisioned name is never open).
        self.provisioned: frozenset[str] = frozenset()

    async def __aenter__(self) -> SecurityContexts:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._dir.chmod(0o700)
        await self.reload()
        self._task = asyncio.create_task(self._watch(), name="security.credentials")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for key in list(self._loaded):
            self._drop(key, delete=False)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.reload()
            except Exception:
                log.exception("security.reload_failed")

    async def reload(self) -> bool:
        """Bring the live map in step with the store; True if anything changed."""
        version = await credentials_version(self._reader)
        if version == self._version:
            return False
        records = {record.key: record for record in await active_credentials(self._reader)}
        for key in [key for key in self._loaded if key not in records]:
            self._drop(key, delete=True)
        for key, record in records.items():
            if key not in self._loaded:
                self._add(record)
        self.provisioned = frozenset(
            record.identity.name for record in records.values() if record.identity.role == "device"
        )
        self._version = version
        log.info("security.credentials_loaded", contexts=len(self._loaded), version=version)
        return True

    def _context_dir(self, key: str) -> Path:
        # Names are operator-chosen text; hex keeps them safe as one path component.
        return self._dir / key.encode("utf-8").hex()

    def _add(self, record: CredentialRecord) -> None:
        if record.kind == KIND_DTLS:
            # The DTLS server transport looks the PSK up by identity in the same map and
            # reports the entry's name as the session's claim.
            entry = DTLS(psk=record.material.master_secret, client_identity=record.psk_identity)
            self.credentials[record.key] = entry
            self._loaded[record.key] = entry
            log.info(
                "security.psk_added",
                role=record.identity.role,
                name=record.identity.name,
                generation=record.generation,
            )
            return
        directory = self._context_dir(record.key)
        if not (directory / "settings.json").exists():
            write_context_dir(directory, record.material)
        try:
            context = FilesystemSecurityContext(str(directory))
        except Exception:
            log.exception(
                "security.context_failed", role=record.identity.role, name=record.identity.name
            )
            return
        context.authenticated_claims = [record.identity.claim]
        self.credentials[record.key] = context
        self._loaded[record.key] = context
        log.info(
            "security.context_added",
            role=record.identity.role,
            name=record.identity.name,
            generation=record.generation,
        )

    def _drop(self, key: str, *, delete: bool) -> None:
        context = self._loaded.pop(key)
        self.credentials.pop(key, None)
        try:
            if getattr(context, "lockfile", None) is not None:
                context._destroy()  # persists the replay window and releases the lock
        except Exception:
            log.exception("security.context_close_failed")
        if delete:
            shutil.rmtree(self._context_dir(key), ignore_errors=True)
            log.info("security.context_removed", key=key.split("#")[0].lstrip(":"))

    def __len__(self) -> int:
        return len(self._loaded)

    def is_live(self, key: str) -> bool:
        """Whether a credentials entry (as a DTLS session names it) is still active."""
        return key in self._loaded
