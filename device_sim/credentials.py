"""Loading a device's credentials (as written by `gateway devices add --credentials oscore`).

The file is in aiocoap's credentials format: a JSON map from URI patterns to credentials,
here `{"coap://*": {"oscore": {"basedir": ".../oscore/"}}}`. A client context with it loaded
protects every request it sends to a matching URI with OSCORE (RFC 8613).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap.credentials import CredentialsMap
from aiocoap.message import Direction
from aiocoap.oscore import FilesystemSecurityContext

CREDENTIALS_FILE = "credentials.json"


def credentials_file(path: str | Path, device: str | None = None) -> Path:
    """The credentials file named by `path`: the file itself, `path/credentials.json`, or
    `path/<device>/credentials.json` (a directory holding several devices' credentials)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if device is not None and (candidate / device / CREDENTIALS_FILE).is_file():
        return candidate / device / CREDENTIALS_FILE
    if (candidate / CREDENTIALS_FILE).is_file():
        return candidate / CREDENTIALS_FILE
    raise FileNotFoundError(f"no credentials for {device or 'this device'} in {path}")


def load_credentials(path: str | Path, device: str | None = None) -> dict[str, Any]:
    data = json.loads(credentials_file(path, device).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a credentials file holds a JSON object")
    return data


async def client_context(path: str | Path | None = None, device: str | None = None) -> Any:
    """An aiocoap client context, with the device's OSCORE credentials when `path` is given."""
    data = load_credentials(path, device) if path is not None else {}
    # "oscore" sits above "udp6": it protects requests for which credentials match;
    # "tinydtls" serves coaps:// URIs (DTLS with a pre-shared key).
    transports = ["oscore", "udp6"] if data else ["udp6"]
    if any(isinstance(entry, dict) and "dtls" in entry for entry in data.values()):
        transports.append("tinydtls")
    context = await aiocoap.Context.create_client_context(transports=transports)
    if data:
        try:
            credentials: CredentialsMap = context.client_credentials
            credentials.load_from_dict(data)
        except BaseException:
            await context.shutdown()
            raise
    return context


class OscoreSession:
    """A device's side of its OSCORE context, for the simulator's own CoAP endpoint.

    `protect` turns a plain request into the OSCORE-protected one to send; `unprotect` turns
    the protected response back into the plain one. A response that is not protected (the
    gateway refused before OSCORE, e.g. 4.01 for an unknown or revoked context) is returned
    as it came.
    """

    def __init__(self, basedir: str) -> None:
        self._context = FilesystemSecurityContext(basedir)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> OscoreSession:
        for entry in load_credentials(path, device).values():
            if isinstance(entry, dict) and isinstance(entry.get("oscore"), dict):
                return cls(str(entry["oscore"]["basedir"]))
        raise ValueError(f"no OSCORE entry in the credentials for {device or path}")

    def protect(self, message: Any) -> tuple[Any, Any]:
        message.direction = Direction.OUTGOING
        protected, request_id = self._context.protect(message)
        return protected, request_id

    def unprotect(self, response: Any, request_id: Any) -> Any:
        if response.opt.oscore is None:
            return response
        response.direction = Direction.INCOMING
        plain, _ = self._context.unprotect(response, request_id)
        return plain

    def close(self) -> None:
        if self._context.lockfile is not None:
            self._context._destroy()  # persists the sequence number, releases the lock
