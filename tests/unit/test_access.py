"""Who may do what, over plain values."""

from __future__ import annotations

import pytest

from gateway.core.access import (
    Identity,
    Subject,
    authorize,
    identity_from_claims,
    subject_device,
)
from gateway.errors import ForbiddenError, UnauthorizedError

ALICE = Identity("device", "alice")
OPS = Identity("operator", "ops")


def check(
    identity: Identity | None,
    method: str,
    path: tuple[str, ...],
    subject: Subject,
    mode: str = "authenticated",
    type_modes: dict[str, str] | None = None,
) -> None:
    authorize(
        identity=identity,
        method=method,
        path=path,
        subject=subject,
        mode=mode,  # type: ignore[arg-type]
        type_modes=type_modes or {},
    )  # type: ignore[arg-type]


def test_claims_round_trip() -> None:
    assert identity_from_claims([ALICE.claim]) == ALICE
    assert identity_from_claims([OPS.claim]) == OPS
    assert identity_from_claims(["something-else", 3]) is None


def test_subject_from_path_and_query() -> None:
    assert subject_device(("r", "fr1"), ()) == ("fr1", None)
    assert subject_device(("rd",), ("ep=fr1", "et=fridge", "lt=60")) == ("fr1", "fridge")
    assert subject_device(("rd",), ()) == (None, None)
    assert subject_device(("cmd", "fr1"), ()) == (None, None)


def test_anonymous_needs_credentials_in_authenticated_mode() -> None:
    with pytest.raises(UnauthorizedError):
        check(None, "POST", ("r", "alice"), Subject("alice", "fridge"))
    check(None, "GET", (".well-known", "core"), Subject())
    check(None, "POST", ("r", "alice"), Subject("alice", "fridge"), mode="open")


def test_device_bound_to_its_name_in_every_mode() -> None:
    for mode in ("open", "authenticated"):
        check(ALICE, "POST", ("r", "alice"), Subject("alice"), mode=mode)
        with pytest.raises(ForbiddenError):
            check(ALICE, "POST", ("r", "bob"), Subject("bob"), mode=mode)
        with pytest.raises(ForbiddenError):
            check(ALICE, "POST", ("rd",), Subject("bob"), mode=mode)


def test_admin_needs_an_operator() -> None:
    with pytest.raises(ForbiddenError):
        check(ALICE, "POST", ("cmd", "alice"), Subject())
    with pytest.raises(UnauthorizedError):
        check(None, "POST", ("cmd", "alice"), Subject())
    check(OPS, "POST", ("cmd", "alice"), Subject())
    check(OPS, "POST", ("r", "alice"), Subject("alice"))


def test_type_override_and_provisioned_names() -> None:
    lights = {"streetlight": "authenticated"}
    with pytest.raises(UnauthorizedError):
        check(None, "POST", ("r", "l1"), Subject("l1", "streetlight"), "open", lights)
    check(None, "POST", ("r", "f1"), Subject("f1", "fridge"), "open", lights)
    check(None, "POST", ("r", "t1"), Subject("t1", "tracker"), "authenticated", {"tracker": "open"})
    # A provisioned name cannot be used anonymously through an "open" type.
    with pytest.raises(UnauthorizedError):
        check(
            None,
            "POST",
            ("rd",),
            Subject("t1", "tracker", provisioned=True),
            "authenticated",
            {"tracker": "open"},
        )
