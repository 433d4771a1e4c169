"""Message deduplication (RFC 7252 §4.5) at a fraction of aiocoap's memory.

aiocoap remembers every request's (peer, Message ID) for EXCHANGE_LIFETIME (247 s) so that
a retransmitted request is answered again instead of processed twice. It does so with a
timer per message and keeps the answer as a `Message`, which holds the whole request it
answers: about 3.8 KB per request. At 3,000 requests/s that is some 740,000 entries and
2.5 GB, and every expiry is a timer on the event loop's heap.

`RecentMessages` keeps the same facts in a dict from (peer, Message ID) to the answer's
bytes, and forgets them in buckets of a quarter second, oldest first, with one timer for
all: about half a kilobyte per request. `CompactDeduplication` puts it in place of the two
methods of an aiocoap message manager that use the cache; everything else (which messages
are deduplicated, what a duplicate is answered with, the log lines) stays aiocoap's.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from aiocoap.message import Direction, Message
from aiocoap.numbers.types import ACK, CON, RST

#: How far past its lifetime an entry may live, so that one timer and one list serve
#: every message of such a slice of time.
BUCKET_SECONDS = 0.25


class RecentMessages:
    """The (peer, Message ID) pairs seen within their lifetime, and the answer each got.

    Free of I/O and of clocks: the caller says what time it is. An entry lives at least
    until the time given when it was remembered, and at most `bucket_seconds` longer.
    """

    def __init__(self, bucket_seconds: float = BUCKET_SECONDS) -> None:
        self._bucket_seconds = bucket_seconds
        self._answers: dict[Hashable, bytes | None] = {}
        #: (forget at, keys), in the order they were remembered.
        self._buckets: deque[tuple[float, list[Hashable]]] = deque()

    def __len__(self) -> int:
        return len(self._answers)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._answers

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._answers)

    def answer(self, key: Hashable) -> bytes | None:
        """The answer recorded for `key`, or None if it has none (yet)."""
        return self._answers.get(key)

    def remember(self, key: Hashable, until: float) -> float | None:
        """Remember `key`, without an answer, until at least `until`.

        Returns the time a new bucket must be forgotten at, when this entry opened one
        and no older bucket is waiting (so the caller knows to set a timer), else None.
        """
        self._answers[key] = None
        buckets = self._buckets
        if buckets and until <= buckets[-1][0]:
            buckets[-1][1].append(key)
            return None
        forget_at = until + self._bucket_seconds
        buckets.append((forget_at, [key]))
        return forget_at if len(buckets) == 1 else None

    def record_answer(self, key: Hashable, encode: Callable[[], bytes]) -> bool:
        """Keep `encode()` as the answer to `key`, if `key` is remembered (only then is
        the answer encoded: most messages sent answer nothing remembered)."""
        if key not in self._answers:
            return False
        self._answers[key] = encode()
        return True

    def forget_expired(self, now: float) -> float | None:
        """Forget every bucket due by `now`; when the next one is due, if any.

        Buckets are forgotten in the order they were made: one whose entries were given a
        shorter lifetime than its predecessors' waits for them (lives longer, never less).
        """
        buckets = self._buckets
        answers = self._answers
        while buckets and buckets[0][0] <= now:
            for key in buckets.popleft()[1]:
                answers.pop(key, None)
        return buckets[0][0] if buckets else None


class CompactDeduplication:
    """`RecentMessages` in place of an aiocoap message manager's own cache."""

    def __init__(self, manager: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.recent = RecentMessages()
        self._manager = manager
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def install(cls, context: Any) -> list[CompactDeduplication]:
        """Put one in each of the context's message managers (those of UDP and DTLS; the
        reliable transports have no message layer to deduplicate)."""
        loop = asyncio.get_running_loop()
        installed = []
        for token_manager in context.request_interfaces:
            manager: Any = getattr(token_manager, "token_interface", None)
            if not (
                hasattr(manager, "_deduplicate_message")
                and hasattr(manager, "_store_response_for_duplicates")
                and hasattr(manager, "_send_initially")
            ):
                continue
            dedup = cls(manager, loop)
            manager._deduplicate_message = dedup.deduplicate
            manager._store_response_for_duplicates = dedup.record_answer
            installed.append(dedup)
        return installed

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def deduplicate(self, message: Message) -> bool:
        """True if `message` is a duplicate, after answering it again if it is a CON
        whose answer is known (what aiocoap's `_deduplicate_message` does)."""
        key = (message.remote, message.mid)
        recent = self.recent
        if key not in recent:
            lifetime = message.transport_tuning.EXCHANGE_LIFETIME
            forget_at = recent.remember(key, self._loop.time() + lifetime)
            if forget_at is not None and self._timer is None:
                self._timer = self._loop.call_at(forget_at, self._forget_expired)
            return False
        log = self._manager.log
        if message.mtype is not CON:
            log.info("Duplicate NON, ACK or RST received")
            return True
        encoded = recent.answer(key)
        if encoded is None:
            log.info("Duplicate CON received, no response to send yet")
            return True
        log.info("Duplicate CON received, sending old response again")
        answer = Message.decode(encoded, message.remote.as_response_address())
        answer.direction = Direction.OUTGOING
        # As aiocoap does: straight to the wire, keeping the message id.
        self._manager._send_initially(answer)
        return True

    def record_answer(self, message: Message) -> None:
        """Keep what answers a remembered request (its ACK, piggybacked or empty, or a
        RST) as bytes: a `Message` would hold the whole request too."""
        if message.mtype is ACK or message.mtype is RST:
            self.recent.record_answer((message.remote, message.mid), message.encode)

    def _forget_expired(self) -> None:
        self._timer = None
        next_due = self.recent.forget_expired(self._loop.time())
        if next_due is not None:
            self._timer = self._loop.call_at(next_due, self._forget_expired)
