"""Deduplication keeps aiocoap's behaviour (a retransmitted request is answered again,
never processed twice) for as long as RFC 7252 asks, and then forgets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.numbers.types import ACK, CON, NON
from hypothesis import given
from hypothesis import strategies as st

from gateway.coap.dedup import CompactDeduplication, RecentMessages


@dataclass(frozen=True)
class Peer:
    host: str
    port: int

    def as_response_address(self) -> Peer:
        return self


class ShortLived(TransportTuning):  # type: ignore[misc]
    EXCHANGE_LIFETIME = 0.05


class Manager:
    """What of an aiocoap message manager the deduplication uses."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.log = _Log()

    def _deduplicate_message(self, message: Message) -> bool:
        raise AssertionError("replaced")

    def _store_response_for_duplicates(self, message: Message) -> None:
        raise AssertionError("replaced")

    def _send_initially(self, message: Message) -> None:
        self.sent.append(message)


class _Log:
    def info(self, *args: Any) -> None:
        pass


class Context:
    def __init__(self, manager: Manager) -> None:
        self.request_interfaces = [type("TokenManager", (), {"token_interface": manager})()]


@pytest.fixture
async def installed() -> AsyncIterator[tuple[Manager, CompactDeduplication]]:
    manager = Manager()
    (dedup,) = CompactDeduplication.install(Context(manager))
    yield manager, dedup
    dedup.close()


def incoming(mid: int, mtype: Any = CON, peer: Peer = Peer("127.0.0.1", 5683)) -> Message:
    message = Message.decode(
        Message(code=Code.POST, payload=b"\xa1dtemp\xf9D\x00", _mtype=mtype, _mid=mid).encode()
    )
    message.remote = peer
    return message


def ack(request: Message, code: Code = Code.CHANGED) -> Message:
    answer = Message(code=code, payload=b"", _mtype=ACK, _mid=request.mid)
    answer.remote = request.remote.as_response_address()
    return answer


# An operation: remember key k at the clock's time, or advance the clock by dt.
operations = st.lists(
    st.one_of(
        st.tuples(st.just("remember"), st.integers(0, 40)),
        st.tuples(st.just("advance"), st.floats(0, 3, allow_nan=False)),
    ),
    max_size=60,
)


@given(operations, st.floats(0.1, 5), st.floats(0.01, 1))
def test_an_entry_lives_its_lifetime_and_at_most_a_bucket_longer(
    steps: list[tuple[str, Any]], lifetime: float, bucket: float
) -> None:
    recent = RecentMessages(bucket_seconds=bucket)
    now = 0.0
    remembered_at: dict[int, float] = {}
    for step, value in steps:
        if step == "remember":
            if value not in recent:
                recent.remember(value, now + lifetime)
                remembered_at[value] = now
        else:
            now += value
            recent.forget_expired(now)
        for key, at in list(remembered_at.items()):
            if now < at + lifetime:
                assert key in recent
            elif now >= at + lifetime + bucket:
                assert key not in recent
            if key not in recent:
                del remembered_at[key]
    assert set(recent) == set(remembered_at)


def test_timers_are_asked_for_only_by_the_first_waiting_bucket() -> None:
    recent = RecentMessages(bucket_seconds=0.25)
    assert recent.remember("a", 10.0) == 10.25
    assert recent.remember("b", 10.2) is None  # same bucket
    assert recent.remember("c", 10.3) is None  # a new bucket, behind a timer already set
    assert recent.forget_expired(10.25) == 10.55
    assert set(recent) == {"c"}
    assert recent.forget_expired(10.55) is None
    assert len(recent) == 0
    assert recent.remember("d", 20.0) == 20.25


def test_answers_are_kept_only_for_remembered_messages() -> None:
    recent = RecentMessages()
    assert not recent.record_answer("x", lambda: b"\x60\x44\x00\x01")
    assert "x" not in recent
    recent.remember("x", 1.0)
    assert recent.answer("x") is None
    assert recent.record_answer("x", lambda: b"\x60\x44\x00\x01")
    assert recent.answer("x") == b"\x60\x44\x00\x01"


async def test_a_duplicate_is_answered_with_the_same_bytes_and_not_processed(
    installed: tuple[Manager, CompactDeduplication],
) -> None:
    manager, _ = installed
    request = incoming(0x1234)
    assert manager._deduplicate_message(request) is False
    # Retransmitted before the answer is ready: dropped, nothing to send yet.
    assert manager._deduplicate_message(incoming(0x1234)) is True
    assert manager.sent == []
    answer = ack(request)
    manager._store_response_for_duplicates(answer)
    assert manager._deduplicate_message(incoming(0x1234)) is True
    (again,) = manager.sent
    assert again.encode() == answer.encode()
    assert again.remote == request.remote
    # Another peer's message with the same id is a new message.
    assert manager._deduplicate_message(incoming(0x1234, peer=Peer("::1", 1))) is False
    # A NON duplicate is dropped without an answer.
    assert manager._deduplicate_message(incoming(7, NON)) is False
    assert manager._deduplicate_message(incoming(7, NON)) is True
    assert len(manager.sent) == 1


async def test_only_acks_and_resets_are_kept_and_only_as_bytes(
    installed: tuple[Manager, CompactDeduplication],
) -> None:
    """A kept `Message` would hold its request, payload and all, for four minutes."""
    manager, dedup = installed
    request = incoming(1)
    manager._deduplicate_message(request)
    separate = Message(code=Code.CHANGED, payload=b"", _mtype=CON, _mid=1)
    separate.remote = request.remote
    manager._store_response_for_duplicates(separate)  # our own CON, same id by chance
    assert dedup.recent.answer((request.remote, 1)) is None
    manager._store_response_for_duplicates(ack(request))
    assert dedup.recent.answer((request.remote, 1)) == ack(request).encode()


async def test_messages_are_forgotten_after_their_exchange_lifetime(
    installed: tuple[Manager, CompactDeduplication],
) -> None:
    manager, dedup = installed
    all_forgotten = asyncio.Event()
    forget_expired = dedup.recent.forget_expired

    def forgetting(now: float) -> float | None:
        next_due = forget_expired(now)
        if not len(dedup.recent):
            all_forgotten.set()
        return next_due

    dedup.recent.forget_expired = forgetting  # type: ignore[method-assign]
    first = incoming(9)
    first.transport_tuning = ShortLived()
    assert manager._deduplicate_message(first) is False
    assert manager._deduplicate_message(incoming(9)) is True
    await asyncio.wait_for(all_forgotten.wait(), 5)
    # The same id from the same peer after the lifetime is a new message.
    assert manager._deduplicate_message(incoming(9)) is False
