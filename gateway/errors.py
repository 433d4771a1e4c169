"""The GatewayError tree.

Errors are sorted by who is at fault and what happens next. A device's mistake is a
`DeviceError` and carries the CoAP response code it earns, so the CoAP layer answers with
`error.coap_code` and `error.diagnostic` and never keeps its own ladder of codes. Failures
of downstream sinks are split into transient (retry later) and permanent (dead letter).
"""

from __future__ import annotations

from aiocoap.numbers.codes import Code


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; `key` names the offending setting when known."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DeviceError(GatewayError):
    """A request from a device was wrong. Answered with `coap_code` and a short diagnostic."""

    coap_code: Code = Code.BAD_REQUEST

    def __init__(self, diagnostic: str, *, device: str | None = None) -> None:
        super().__init__(diagnostic)
        self.diagnostic = diagnostic
        self.device = device


class DecodeError(DeviceError):
    """The payload is not well-formed CBOR, JSON or SenML (4.00)."""

    coap_code = Code.BAD_REQUEST


class BadRequestError(DeviceError):
    """A malformed query, path or option (4.00)."""

    coap_code = Code.BAD_REQUEST


class UnsupportedFormatError(DeviceError):
    """The Content-Format is not one we accept (4.15)."""

    coap_code = Code.UNSUPPORTED_CONTENT_FORMAT


class NotAcceptableError(DeviceError):
    """The Accept option asks for a format we cannot produce (4.06)."""

    coap_code = Code.NOT_ACCEPTABLE


class PayloadTooLargeError(DeviceError):
    """The payload exceeds the configured limit (4.13, with Size1 = the limit)."""

    coap_code = Code.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, diagnostic: str, *, limit: int, device: str | None = None) -> None:
        super().__init__(diagnostic, device=device)
        self.limit = limit


class UnknownDeviceError(DeviceError):
    """No such device or registration (4.04)."""

    coap_code = Code.NOT_FOUND


class ValidationError(DeviceError):
    """Well-formed, but wrong: a type, a range, too many fields (4.22); `field` is named."""

    coap_code = Code.UNPROCESSABLE_ENTITY

    def __init__(self, diagnostic: str, *, field: str | None = None, device: str | None = None):
        super().__init__(diagnostic, device=device)
        self.field = field


class OverloadedError(DeviceError):
    """The gateway cannot take this now; the device should retry after `max_age` (5.03)."""

    coap_code = Code.SERVICE_UNAVAILABLE

    def __init__(self, diagnostic: str, *, max_age: int, device: str | None = None) -> None:
        super().__init__(diagnostic, device=device)
        self.max_age = max_age


class UnauthorizedError(DeviceError):
    """No credential, or one the gateway does not know (4.01)."""

    coap_code = Code.UNAUTHORIZED


class ForbiddenError(DeviceError):
    """An authenticated peer acting outside its grant, e.g. posting as another device (4.03)."""

    coap_code = Code.FORBIDDEN


class TooManyRequestsError(DeviceError):
    """A peer or device is over its rate limit; retry after `max_age` seconds (4.29, RFC 8516)."""

    coap_code = Code.TOO_MANY_REQUESTS

    def __init__(self, diagnostic: str, *, max_age: int, device: str | None = None) -> None:
        super().__init__(diagnostic, device=device)
        self.max_age = max_age


class StoreError(GatewayError):
    """The database failed; the request is answered 5.00 and nothing is acknowledged."""


class SinkError(GatewayError):
    """A delivery to a downstream sink failed."""

    def __init__(self, message: str, *, sink: str, attempt: int | None = None) -> None:
        super().__init__(message)
        self.sink = sink
        self.attempt = attempt


class TransientSinkError(SinkError):
    """Worth retrying later: the broker is down, a timeout, an HTTP 5xx."""


class PermanentSinkError(SinkError):
    """Retrying cannot help (an HTTP 4xx, a payload the sink refuses): dead-letter it."""
