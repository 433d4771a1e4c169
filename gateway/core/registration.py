"""Registration requests (RFC 9176 §5.3): query parameters and link-format payloads. Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from aiocoap.util import linkformat

from gateway.errors import BadRequestError, PayloadTooLargeError

ENDPOINT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
TYPE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
GENERIC_TYPE = "generic"


@dataclass(frozen=True, slots=True)
class HostedResource:
    """A resource the device hosts, as its link-format payload announced it."""

    path: str
    observable: bool
    attributes: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    endpoint: str
    device_type: str
    lifetime: int
    queue_mode: bool
    links: str
    resources: tuple[HostedResource, ...]


@dataclass(frozen=True, slots=True)
class LifetimeBounds:
    default: int
    minimum: int
    maximum: int


def parse_query(query: Sequence[str]) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in query:
        key, sep, value = item.partition("=")
        if not key:
            raise BadRequestError("empty query parameter")
        if key in params:
            raise BadRequestError(f"query parameter {key!r:.20} given twice")
        params[key] = value if sep else None
    return params


def check_endpoint_name(name: str) -> str:
    if not ENDPOINT_PATTERN.match(name):
        raise BadRequestError(f"endpoint name {name!r:.70} must match {ENDPOINT_PATTERN.pattern}")
    return name


def parse_lifetime(raw: str | None, bounds: LifetimeBounds) -> int:
    if raw is None:
        return bounds.default
    if not raw.isdigit():
        raise BadRequestError("lt must be a whole number of seconds")
    lifetime = int(raw)
    if not bounds.minimum <= lifetime <= bounds.maximum:
        raise BadRequestError(f"lt must be {bounds.minimum}..{bounds.maximum} seconds")
    return lifetime


def parse_links(payload: bytes, *, max_size: int) -> tuple[str, tuple[HostedResource, ...]]:
    if len(payload) > max_size:
        raise PayloadTooLargeError(f"link-format payload over {max_size} bytes", limit=max_size)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError("link-format payload is not UTF-8") from exc
    if not text.strip():
        return "", ()
    try:
        parsed = linkformat.parse(text)
    except Exception as exc:  # the vendored parser raises its own ParseException
        raise BadRequestError("malformed link-format payload") from exc
    resources = []
    for link in parsed.links:
        attributes = tuple(
            (str(key), None if value is None else str(value)) for key, value in link.attr_pairs
        )
        resources.append(
            HostedResource(
                path=str(link.href),
                observable=any(key == "obs" for key, _ in attributes),
                attributes=attributes,
            )
        )
    return text, tuple(resources)


def parse_registration(
    query: Sequence[str], payload: bytes, *, bounds: LifetimeBounds, max_links_size: int
) -> RegistrationRequest:
    """`POST /rd?ep=NAME&et=TYPE&lt=SECONDS[&q]` with an optional link-format payload."""
    params = parse_query(query)
    endpoint = params.get("ep")
    if not endpoint:
        raise BadRequestError("ep (endpoint name) is required")
    device_type = params.get("et") or GENERIC_TYPE
    if not TYPE_PATTERN.match(device_type):
        raise BadRequestError(f"et must match {TYPE_PATTERN.pattern}")
    links, resources = parse_links(payload, max_size=max_links_size)
    return RegistrationRequest(
        endpoint=check_endpoint_name(endpoint),
        device_type=device_type,
        lifetime=parse_lifetime(params.get("lt"), bounds),
        queue_mode="q" in params,
        links=links,
        resources=resources,
    )


def parse_update(query: Sequence[str], *, bounds: LifetimeBounds) -> int | None:
    """`POST /rd/<id>[?lt=SECONDS]`: the new lifetime, or None to keep the current one."""
    params = parse_query(query)
    raw = params.get("lt")
    return None if raw is None else parse_lifetime(raw, bounds)
