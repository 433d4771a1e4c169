"""Device authentication (OSCORE), access policy, rate limits and bounds.

`SecurityLayer` is what the gateway enters: it loads the live OSCORE contexts from the store
and keeps them current, and `wrap(site)` returns the root resource the CoAP server serves:
aiocoap's `OscoreSiteWrapper` (checked for malformed options first) around the `Guard` around
the gateway's site.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite
import structlog

from gateway.config import SecurityConfig
from gateway.errors import ConfigError
from gateway.registry import Registry
from gateway.security.contexts import SecurityContexts
from gateway.security.guard import Guard
from gateway.security.hardening import CheckedOscoreSiteWrapper, install_option_decoding_fix

log = structlog.get_logger(__name__)

__all__ = ["Guard", "SecurityContexts", "SecurityLayer", "contexts_dir_for"]


def contexts_dir_for(config: SecurityConfig, store_path: str) -> Path:
    if config.contexts_dir:
        return Path(config.contexts_dir)
    return Path(store_path).absolute().parent / "oscore"


class SecurityLayer:
    def __init__(
        self,
        config: SecurityConfig,
        *,
        reader: aiosqlite.Connection,
        registry: Registry,
        store_path: str,
    ) -> None:
        self.config = config
        self._reader = reader
        self._registry = registry
        self.contexts = SecurityContexts(
            reader, contexts_dir_for(config, store_path), interval=config.reload_interval
        )
        self.guard: Guard | None = None

    async def __aenter__(self) -> SecurityLayer:
        install_option_decoding_fix()
        if self.config.dtls and importlib.util.find_spec("DTLSSocket") is None:
            raise ConfigError(
                "security.dtls needs the DTLSSocket package: pip install 'coap-gateway[dtls]'",
                key="security.dtls",
            )
        await self.contexts.__aenter__()
        if self.config.mode == "open":
            log.warning(
                "security.open_mode",
                detail="anyone who reaches the port may register and post; see docs/security.md",
                authenticated_types=sorted(
                    t for t, m in self.config.type_modes.items() if m == "authenticated"
                ),
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.contexts.__aexit__(exc_type, exc, tb)

    async def _owner_of(self, registration_id: str) -> tuple[str, str] | None:
        async with self._reader.execute(
            "SELECT d.name, d.type FROM registrations r JOIN devices d ON d.id = r.device_id"
            " WHERE r.id = ?",
            (registration_id,),
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def server_options(self) -> dict[str, Any]:
        """Extra arguments for `CoapServer`: the DTLS transport and its PSK store, if on."""
        if not self.config.dtls:
            return {}
        return {
            "extra_transports": ("tinydtls_server",),
            "server_credentials": self.contexts.credentials,
        }

    def wrap(self, site: Any) -> Any:
        """The root resource to serve: OSCORE unprotection, then the guard, then `site`."""
        self.guard = Guard(
            site,
            self.config,
            registry=self._registry,
            provisioned=lambda: self.contexts.provisioned,
            owner_of=self._owner_of,
            is_live=self.contexts.is_live,
        )
        return CheckedOscoreSiteWrapper(self.guard, self.contexts.credentials)
