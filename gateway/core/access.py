"""Who may do what: the access decision for one request, over plain values.

Pure: the CoAP layer resolves the facts (the authenticated identity, the device a request is
about, that device's type and whether it holds credentials) and this module decides. It
raises `UnauthorizedError` (4.01: no or unknown credential) or `ForbiddenError` (4.03: a
known credential acting outside its grant) and returns nothing when the request may proceed.

Rules (docs/security.md has the reasoning):
- An operator identity may do anything.
- A device identity is bound to its name: it may register only as `ep=<its name>`, touch
  only its own registration, and read or post only `/r/<its name>`; commands and other admin
  resources are for operators only. This holds in every mode.
- Without an identity, the effective mode decides: "open" lets the request through;
  "authenticated" answers 4.01, except discovery (`GET /.well-known/core`).
- The effective mode is the per-type override for the subject device's type, else the
  global mode; a device that holds credentials is always treated as "authenticated", so an
  anonymous peer cannot take over a provisioned name through an "open" device type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.errors import ForbiddenError, UnauthorizedError

Mode = Literal["open", "authenticated"]
Role = Literal["device", "operator"]

DEVICE_CLAIM = "device:"
OPERATOR_CLAIM = "operator:"


@dataclass(frozen=True, slots=True)
class Identity:
    role: Role
    name: str

    @property
    def claim(self) -> str:
        return (OPERATOR_CLAIM if self.role == "operator" else DEVICE_CLAIM) + self.name


def identity_from_claims(claims: Sequence[object]) -> Identity | None:
    """The identity named by the first claim we issued, if any (see `Identity.claim`).

    OSCORE contexts carry the claim itself (`device:NAME`); a DTLS session carries the name
    of its credentials entry (`:device:NAME#GENERATION`), which names the same identity.
    """
    for claim in claims:
        if not isinstance(claim, str):
            continue
        if claim.startswith(":"):
            claim = claim[1:].rsplit("#", 1)[0]
        if claim.startswith(DEVICE_CLAIM):
            return Identity("device", claim[len(DEVICE_CLAIM) :])
        if claim.startswith(OPERATOR_CLAIM):
            return Identity("operator", claim[len(OPERATOR_CLAIM) :])
    return None


@dataclass(frozen=True, slots=True)
class Subject:
    """The device a request is about, as far as the request names one."""

    #: Device name named by the path or query (`/r/NAME`, `ep=NAME`), or the owner of
    #: `/rd/<id>`; None when the request names no device.
    device: str | None = None
    device_type: str | None = None
    provisioned: bool = False


def subject_device(path: Sequence[str], query: Sequence[str]) -> tuple[str | None, str | None]:
    """Device name and type the path or query names: `/r/NAME`, `POST /rd?ep=NAME&et=TYPE`."""
    if len(path) == 2 and path[0] == "r":
        return path[1], None
    if len(path) == 1 and path[0] == "rd":
        values = dict(item.split("=", 1) for item in query if "=" in item)
        return values.get("ep"), values.get("et")
    return None, None


def is_admin_path(path: Sequence[str], admin_prefixes: Sequence[str]) -> bool:
    return bool(path) and path[0] in admin_prefixes


def is_discovery(method: str, path: Sequence[str]) -> bool:
    return method == "GET" and tuple(path) == (".well-known", "core")


def effective_mode(mode: Mode, type_modes: Mapping[str, Mode], subject: Subject) -> Mode:
    if subject.provisioned:
        return "authenticated"
    if subject.device_type is not None and subject.device_type in type_modes:
        return type_modes[subject.device_type]
    return mode


def authorize(
    *,
    identity: Identity | None,
    method: str,
    path: Sequence[str],
    subject: Subject,
    mode: Mode,
    type_modes: Mapping[str, Mode],
    admin_prefixes: Sequence[str] = ("cmd",),
) -> None:
    """Return if the request may proceed; raise 4.01 or 4.03 otherwise."""
    admin = is_admin_path(path, admin_prefixes)
    if identity is not None and identity.role == "operator":
        return
    if identity is not None:
        if admin:
            raise ForbiddenError(f"/{path[0]} needs an operator credential", device=identity.name)
        if subject.device is not None and subject.device != identity.name:
            raise ForbiddenError(
                f"credential of {identity.name!r:.40} cannot act for {subject.device!r:.40}",
                device=identity.name,
            )
        return
    if is_discovery(method, path):
        return
    if admin:
        if mode == "authenticated":
            raise UnauthorizedError(f"/{path[0]} needs an operator credential")
        return
    if effective_mode(mode, type_modes, subject) == "authenticated":
        raise UnauthorizedError(
            "authentication required (OSCORE)",
            device=subject.device,
        )
