"""Commands for devices: their states, the allowed moves, and the wire description. Pure.

A command is queued, sent when the device can be reached, and settled by the device's
response: acknowledged (2.xx) or failed (an error code, or no answer after the last
attempt). A command whose TTL passes while queued is expired and never sent. A command that
was sent but got no answer (the device fell asleep, the gateway restarted) goes back to
queued and is sent again in the device's next window, until it runs out of attempts.

Every state change goes through `transition`, which raises on a move the table does not allow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import cbor2

from gateway.core.readings import CF_CBOR, CF_JSON, CF_TEXT, load_cbor
from gateway.errors import BadRequestError, GatewayError, UnsupportedFormatError


class CommandState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    FAILED = "failed"
    EXPIRED = "expired"


#: The one table of allowed moves. SENT -> QUEUED is a retry after a lost exchange.
TRANSITIONS: Mapping[CommandState, frozenset[CommandState]] = {
    CommandState.QUEUED: frozenset({CommandState.SENT, CommandState.EXPIRED, CommandState.FAILED}),
    CommandState.SENT: frozenset(
        {CommandState.ACKNOWLEDGED, CommandState.FAILED, CommandState.QUEUED}
    ),
    CommandState.ACKNOWLEDGED: frozenset(),
    CommandState.FAILED: frozenset(),
    CommandState.EXPIRED: frozenset(),
}

FINAL_STATES = frozenset(state for state, moves in TRANSITIONS.items() if not moves)


class IllegalTransition(GatewayError):
    def __init__(self, current: CommandState, target: CommandState) -> None:
        super().__init__(f"command cannot move from {current} to {target}")
        self.current = current
        self.target = target


def transition(current: str, target: CommandState) -> CommandState:
    state = CommandState(current)
    if target not in TRANSITIONS[state]:
        raise IllegalTransition(state, target)
    return target


METHODS = ("GET", "POST", "PUT", "DELETE")
MAX_TTL = 365 * 86_400
MAX_PATH = 255
MAX_PAYLOAD = 1024


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """What to send: method and path on the device, payload and its Content-Format."""

    method: str
    path: str
    payload: bytes = b""
    content_format: int | None = None
    ttl: float | None = None

    def expires_at(self, now: float) -> float | None:
        return None if self.ttl is None else now + self.ttl


def check_command(
    method: str, path: str, payload: bytes, content_format: int | None, ttl: float | None
) -> CommandRequest:
    method = method.upper()
    if method not in METHODS:
        raise BadRequestError(f"method must be one of {', '.join(METHODS)}")
    if not path.startswith("/") or len(path) > MAX_PATH or any(c in path for c in "?# \n"):
        raise BadRequestError("path must be an absolute path like /light, without a query")
    if len(payload) > MAX_PAYLOAD:
        raise BadRequestError(f"payload over {MAX_PAYLOAD} bytes")
    if ttl is not None and (not math.isfinite(ttl) or not 0 < ttl <= MAX_TTL):
        raise BadRequestError(f"ttl must be 0 < ttl <= {MAX_TTL} seconds")
    return CommandRequest(method, path, payload, content_format, ttl)


def parse_command_description(payload: bytes, content_format: int | None) -> CommandRequest:
    """The CBOR body of `POST /cmd/NAME`: `{"path", "method"?, "payload"?, "ttl"?}`.

    `payload` is any CBOR value, sent to the device CBOR-encoded (Content-Format 60); a byte
    string is sent as it is, with the Content-Format given as "cf" (default none).
    """
    if content_format not in (None, CF_CBOR):
        raise UnsupportedFormatError("a command description must be CBOR (60)")
    # The same strict decoding as readings: tags refused, a clean 4.00 for broken bytes.
    document = load_cbor(payload)
    if not isinstance(document, dict):
        raise BadRequestError("command description must be a CBOR map")
    unknown = set(document) - {"path", "method", "payload", "ttl", "cf"}
    if unknown:
        raise BadRequestError(f"unknown keys in command description: {sorted(map(str, unknown))}")
    path = document.get("path")
    method = document.get("method", "PUT")
    ttl = document.get("ttl")
    if not isinstance(path, str) or not isinstance(method, str):
        raise BadRequestError("path and method must be text")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
        raise BadRequestError("ttl must be a number of seconds")
    body, cf = encode_command_payload(document.get("payload"), document.get("cf"))
    return check_command(method, path, body, cf, None if ttl is None else float(ttl))


def encode_command_payload(value: Any, cf: Any = None) -> tuple[bytes, int | None]:
    if value is None:
        return b"", None
    if isinstance(value, bytes):
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, int)):
            raise BadRequestError("cf must be a Content-Format number")
        return value, cf
    return cbor2.dumps(value), CF_CBOR


def payload_from_json(text: str) -> tuple[bytes, int]:
    """`--payload-json`: JSON text, sent to the device as CBOR."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadRequestError(f"payload is not JSON: {exc}") from exc
    return cbor2.dumps(value), CF_CBOR


def describe_payload(payload: bytes | None, content_format: int | None) -> Any:
    """A response payload as a value for people and relayed messages."""
    if not payload:
        return None
    if content_format == CF_CBOR:
        try:
            return cbor2.loads(payload)
        except Exception:
            return payload.hex()
    if content_format in (CF_JSON, CF_TEXT, None):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return payload.hex()
        if content_format == CF_JSON:
            try:
                return json.loads(text)
            except ValueError:
                return text
        return text
    return payload.hex()


def outcome_of(code_class: int) -> CommandState:
    """The device's response code class decides how a sent command settles."""
    return CommandState.ACKNOWLEDGED if code_class == 2 else CommandState.FAILED
