"""Outbox delivery states, retry arithmetic and batch planning. Pure: no I/O, no clock.

Every outbox row is one message for one sink. Its state moves only along `TRANSITIONS`;
the store asks `check_transition` before it writes a new state, so an illegal move is a bug
that raises instead of a row that silently changes meaning.

Retries live in the database (`attempt`, `next_attempt_at`); this module only computes
them. `plan_batch` decides which rows a sink worker may send now without letting a later
message of a device overtake an earlier one that is still waiting for its retry.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from gateway.errors import GatewayError


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    DEAD = "dead"


_S = DeliveryState

#: The only allowed moves. pending -> dead is the age limit (or an entry that cannot be
#: encoded) found before sending; in_flight -> pending is a retry or a release after
#: cancellation; dead -> pending is an operator's replay.
TRANSITIONS: Mapping[DeliveryState, frozenset[DeliveryState]] = {
    _S.PENDING: frozenset({_S.IN_FLIGHT, _S.DEAD}),
    _S.IN_FLIGHT: frozenset({_S.DELIVERED, _S.PENDING, _S.DEAD}),
    _S.DELIVERED: frozenset(),
    _S.DEAD: frozenset({_S.PENDING}),
}


class IllegalTransitionError(GatewayError):
    """A state move that `TRANSITIONS` does not allow."""

    def __init__(self, current: DeliveryState, target: DeliveryState) -> None:
        super().__init__(f"outbox entry cannot move from {current} to {target}")
        self.current = current
        self.target = target


def check_transition(current: DeliveryState, target: DeliveryState) -> DeliveryState:
    """Return `target` if the move is allowed, else raise `IllegalTransitionError`."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransitionError(current, target)
    return target


class Random(Protocol):
    """The part of `random.Random` the backoff needs; tests pass a seeded one."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, and when to give up.

    `attempt` counts attempts already made (1 after the first failure). The delay before the
    next attempt is `min(max_delay, base_delay * factor ** (attempt - 1))`, then reduced by a
    random fraction of at most `jitter`, so it never exceeds the cap and retries of many
    entries spread out instead of arriving together. `max_attempts` and `max_age` of 0 mean
    no limit.
    """

    base_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.2
    max_attempts: int = 10
    max_age: float = 86_400.0

    def __post_init__(self) -> None:
        if not (self.base_delay > 0 and math.isfinite(self.base_delay)):
            raise ValueError("base_delay must be a positive number")
        if not self.factor >= 1:
            raise ValueError("factor must be at least 1")
        if not self.max_delay >= self.base_delay:
            raise ValueError("max_delay must be at least base_delay")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within 0..1")
        if self.max_attempts < 0:
            raise ValueError("max_attempts must not be negative")
        if not self.max_age >= 0:
            raise ValueError("max_age must not be negative")

    def delay(self, attempt: int) -> float:
        """The backoff before the next attempt, without jitter."""
        exponent = max(attempt, 1) - 1
        try:
            raw = self.base_delay * self.factor**exponent
        except OverflowError:
            raw = math.inf
        return min(self.max_delay, raw)

    def next_attempt_at(self, attempt: int, now: float, rng: Random) -> float:
        """When an entry that has failed `attempt` times may be tried again."""
        delay = self.delay(attempt)
        return now + delay * (1.0 - self.jitter * rng.random())

    def should_dead_letter(self, attempt: int, first_at: float, now: float) -> bool:
        """True once `attempt` attempts have failed or the entry is older than `max_age`."""
        if self.max_attempts and attempt >= self.max_attempts:
            return True
        return bool(self.max_age) and now - first_at >= self.max_age


class Outcome(enum.StrEnum):
    """What the sink said about one delivery."""

    CONFIRMED = "confirmed"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class Settlement(NamedTuple):
    """The new state of an entry after an attempt; the store writes exactly this.

    A named tuple, as are `OutboxRow`, the relay's `Entry`, `Outcome` and `Delivery`, and
    the envelope's `Value`: one of each is built for every relayed message, and a frozen
    dataclass takes two to three times as long to build (docs/performance.md, change 26).
    """

    state: DeliveryState
    attempt: int
    next_attempt_at: float | None
    #: Why the entry went to the dead letters ("permanent", "max_attempts", "max_age").
    reason: str | None = None


def settle(
    outcome: Outcome,
    *,
    attempt: int,
    first_at: float,
    policy: RetryPolicy,
    now: float,
    rng: Random,
) -> Settlement:
    """Decide what happens to an in-flight entry; `attempt` counts earlier failed attempts."""
    made = attempt + 1
    if outcome is Outcome.CONFIRMED:
        return Settlement(check_transition(_S.IN_FLIGHT, _S.DELIVERED), made, None)
    dead = check_transition(_S.IN_FLIGHT, _S.DEAD)
    if outcome is Outcome.PERMANENT:
        return Settlement(dead, made, None, "permanent")
    if policy.max_attempts and made >= policy.max_attempts:
        return Settlement(dead, made, None, "max_attempts")
    if policy.should_dead_letter(made, first_at, now):
        return Settlement(dead, made, None, "max_age")
    retry_at = policy.next_attempt_at(made, now, rng)
    return Settlement(check_transition(_S.IN_FLIGHT, _S.PENDING), made, retry_at)


class OutboxRow(NamedTuple):
    """What the planner needs to know about one outbox entry of one sink.

    The planner is offered rows in the order things were stored (the outbox's `pos`, then
    `id`); `plan_batch` sorts by `id`, which is that order where every `pos` is the same.
    """

    id: int
    device: str
    state: DeliveryState
    next_attempt_at: float


@dataclass(frozen=True)
class BatchPlan:
    #: Entries to claim (pending -> in_flight) and send now, in the order offered.
    send: tuple[OutboxRow, ...]
    #: Earliest time a currently blocked or waiting entry becomes due, if any.
    wake_at: float | None


class BatchPlanner:
    """`plan_batch`, one row at a time, for a caller that reads rows in order and wants
    to stop reading as soon as no later row can change the plan."""

    def __init__(self, *, now: float, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._now = now
        self._limit = limit
        self._blocked: set[str] = set()
        self._send: list[OutboxRow] = []
        self._wake_at: float | None = None
        self._final = False

    @property
    def blocked(self) -> frozenset[str]:
        """Devices seen so far whose later rows cannot go now (in flight, or not yet due)."""
        return frozenset(self._blocked)

    def offer(self, row: OutboxRow) -> bool:
        """Take the next row (in stored order); False once the plan is final."""
        if self._final:
            return False
        if row.state in (_S.DELIVERED, _S.DEAD) or row.device in self._blocked:
            return True
        if row.state is _S.IN_FLIGHT:
            self._blocked.add(row.device)
            return True
        if row.next_attempt_at > self._now:
            self._blocked.add(row.device)
            at = row.next_attempt_at
            self._wake_at = at if self._wake_at is None else min(self._wake_at, at)
            return True
        if len(self._send) < self._limit:
            self._send.append(row)
            return True
        # A due row that no longer fits: the worker is to come back at once. Every wake-up
        # so far is later than now and later rows can only add later ones, so the plan is
        # final.
        self._wake_at = self._now
        self._final = True
        return False

    def plan(self) -> BatchPlan:
        return BatchPlan(tuple(self._send), self._wake_at)


def plan_batch(rows: Iterable[OutboxRow], *, now: float, limit: int) -> BatchPlan:
    """Pick at most `limit` due pending entries, keeping each device's order.

    For every device the chosen entries are a prefix of its unfinished entries (pending or
    in flight) in id order: an entry that is in flight, or pending but not yet due, blocks
    every later entry of the same device. Delivered and dead entries block nothing.

    The caller passes a window of unfinished entries in id order (for example the first N);
    since a blocker always precedes what it blocks, a window that starts at the oldest
    unfinished entry never lets a row slip past a blocker outside it.
    """
    planner = BatchPlanner(now=now, limit=limit)
    for row in sorted(rows, key=lambda r: r.id):
        if not planner.offer(row):
            break
    return planner.plan()
