"""Outbox states, backoff and the batch planner."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.outbox import (
    TRANSITIONS,
    BatchPlan,
    BatchPlanner,
    DeliveryState,
    IllegalTransitionError,
    OutboxRow,
    Outcome,
    RetryPolicy,
    check_transition,
    plan_batch,
    settle,
)

S = DeliveryState


def test_every_state_has_a_row_in_the_table() -> None:
    assert set(TRANSITIONS) == set(DeliveryState)


@pytest.mark.parametrize(
    ("current", "target"),
    [(S.DELIVERED, S.PENDING), (S.PENDING, S.DELIVERED), (S.DEAD, S.DELIVERED), (S.DEAD, S.DEAD)],
)
def test_illegal_moves_raise(current: DeliveryState, target: DeliveryState) -> None:
    with pytest.raises(IllegalTransitionError) as info:
        check_transition(current, target)
    assert info.value.current is current and info.value.target is target


def test_replay_moves_a_dead_letter_back_to_pending() -> None:
    assert check_transition(S.DEAD, S.PENDING) is S.PENDING


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(base_delay=1, factor=2, max_delay=10, jitter=0)
    assert [policy.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.delay(10_000) == 10  # no OverflowError on absurd attempt counts


def test_jitter_only_shortens_the_delay() -> None:
    policy = RetryPolicy(base_delay=4, factor=2, max_delay=100, jitter=0.5)

    class Fixed:
        def __init__(self, value: float) -> None:
            self.value = value

        def random(self) -> float:
            return self.value

    assert policy.next_attempt_at(1, 100.0, Fixed(0.0)) == 104.0
    assert policy.next_attempt_at(1, 100.0, Fixed(1.0)) == 102.0


@given(
    base=st.floats(0.01, 100),
    factor=st.floats(1, 10),
    cap_extra=st.floats(0, 10_000),
    jitter=st.floats(0, 1),
    attempt=st.integers(1, 2_000),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_monotone_capped_and_jitter_bounded(
    base: float, factor: float, cap_extra: float, jitter: float, attempt: int, seed: int
) -> None:
    policy = RetryPolicy(base_delay=base, factor=factor, max_delay=base + cap_extra, jitter=jitter)
    assert policy.delay(attempt) <= policy.delay(attempt + 1) <= policy.max_delay
    delay = policy.delay(attempt)
    at = policy.next_attempt_at(attempt, 1000.0, random.Random(seed))
    assert 1000.0 + delay * (1 - jitter) - 1e-9 <= at <= 1000.0 + delay + 1e-9


@pytest.mark.parametrize(
    "kwargs",
    [{"base_delay": 0}, {"factor": 0.5}, {"max_delay": 0.1}, {"jitter": 1.5}, {"max_attempts": -1}],
)
def test_nonsense_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_dead_letter_after_attempts_or_age() -> None:
    policy = RetryPolicy(max_attempts=3, max_age=60)
    assert not policy.should_dead_letter(2, first_at=0, now=59)
    assert policy.should_dead_letter(3, first_at=0, now=1)
    assert policy.should_dead_letter(1, first_at=0, now=60)
    unlimited = RetryPolicy(max_attempts=0, max_age=0)
    assert not unlimited.should_dead_letter(10**9, first_at=0, now=10**12)


def test_settle() -> None:
    policy = RetryPolicy(base_delay=2, jitter=0, max_attempts=3, max_age=100)
    rng = random.Random(1)
    ok = settle(Outcome.CONFIRMED, attempt=0, first_at=0, policy=policy, now=5, rng=rng)
    assert (ok.state, ok.attempt) == (S.DELIVERED, 1)
    retry = settle(Outcome.TRANSIENT, attempt=0, first_at=0, policy=policy, now=5, rng=rng)
    assert (retry.state, retry.attempt, retry.next_attempt_at) == (S.PENDING, 1, 7)
    third = settle(Outcome.TRANSIENT, attempt=2, first_at=0, policy=policy, now=5, rng=rng)
    assert (third.state, third.reason) == (S.DEAD, "max_attempts")
    old = settle(Outcome.TRANSIENT, attempt=0, first_at=0, policy=policy, now=100, rng=rng)
    assert (old.state, old.reason) == (S.DEAD, "max_age")
    bad = settle(Outcome.PERMANENT, attempt=0, first_at=0, policy=policy, now=5, rng=rng)
    assert (bad.state, bad.reason) == (S.DEAD, "permanent")


def row(id: int, device: str, state: DeliveryState = S.PENDING, at: float = 0.0) -> OutboxRow:
    return OutboxRow(id=id, device=device, state=state, next_attempt_at=at)


def ids(plan: BatchPlan) -> list[int]:
    return [r.id for r in plan.send]


def test_a_waiting_retry_holds_back_later_rows_of_its_device_only() -> None:
    rows = [row(1, "a", at=50), row(2, "b"), row(3, "a"), row(4, "b")]
    plan = plan_batch(rows, now=10, limit=10)
    assert ids(plan) == [2, 4]
    assert plan.wake_at == 50


def test_in_flight_rows_block_and_finished_rows_do_not() -> None:
    rows = [row(1, "a", S.IN_FLIGHT), row(2, "a"), row(3, "b", S.DEAD), row(4, "b")]
    rows += [row(5, "c", S.DELIVERED), row(6, "c")]
    assert ids(plan_batch(rows, now=0, limit=10)) == [4, 6]


def test_limit_cuts_in_id_order_and_asks_to_come_back() -> None:
    rows = [row(i, "abc"[i % 3]) for i in range(1, 10)]
    plan = plan_batch(reversed(rows), now=0, limit=4)
    assert ids(plan) == [1, 2, 3, 4]
    assert plan.wake_at == 0


def test_nothing_to_do() -> None:
    assert plan_batch([], now=0, limit=1) == BatchPlan((), None)


states = st.sampled_from(list(DeliveryState))


@given(
    st.lists(
        st.tuples(st.sampled_from("abcd"), states, st.floats(0, 20)),
        max_size=40,
    ),
    st.floats(0, 20),
    st.integers(1, 50),
)
def test_planner_never_lets_a_row_overtake(
    specs: list[tuple[str, DeliveryState, float]], now: float, limit: int
) -> None:
    rows = [row(i, d, s, at) for i, (d, s, at) in enumerate(specs)]
    plan = plan_batch(rows, now=now, limit=limit)
    chosen = {r.id for r in plan.send}
    assert len(chosen) <= limit
    assert ids(plan) == sorted(chosen)
    for r in plan.send:
        assert r.state is S.PENDING and r.next_attempt_at <= now
        # every earlier unfinished row of the same device is also being sent
        for earlier in rows[: r.id]:
            if earlier.device == r.device and earlier.state in (S.PENDING, S.IN_FLIGHT):
                assert earlier.id in chosen
    # nothing due and unblocked is left behind while there is room
    if len(chosen) < limit:
        for r in rows:
            unblocked = all(
                e.state in (S.DELIVERED, S.DEAD) or e.id in chosen
                for e in rows[: r.id]
                if e.device == r.device
            )
            if r.state is S.PENDING and r.next_attempt_at <= now and unblocked:
                assert r.id in chosen


def plan_by_full_scan(rows: list[OutboxRow], *, now: float, limit: int) -> BatchPlan:
    """The planner as it was before it could stop early: every row of the window seen."""
    blocked: set[str] = set()
    send: list[OutboxRow] = []
    wake_at: float | None = None
    for r in sorted(rows, key=lambda r: r.id):
        if r.state in (S.DELIVERED, S.DEAD) or r.device in blocked:
            continue
        if r.state is S.IN_FLIGHT:
            blocked.add(r.device)
        elif r.next_attempt_at > now:
            blocked.add(r.device)
            wake_at = r.next_attempt_at if wake_at is None else min(wake_at, r.next_attempt_at)
        elif len(send) < limit:
            send.append(r)
        else:
            wake_at = now if wake_at is None else min(wake_at, now)
            blocked.add(r.device)
    return BatchPlan(tuple(send), wake_at)


@given(
    st.lists(st.tuples(st.sampled_from("abcd"), states, st.floats(0, 20)), max_size=40),
    st.floats(0, 20),
    st.integers(1, 10),
)
def test_the_planner_stops_reading_only_when_the_rest_cannot_matter(
    specs: list[tuple[str, DeliveryState, float]], now: float, limit: int
) -> None:
    rows = [row(i, d, s, at) for i, (d, s, at) in enumerate(specs)]
    planner = BatchPlanner(now=now, limit=limit)
    read = 0
    for r in rows:
        read += 1
        if not planner.offer(r):
            break
    assert planner.plan() == plan_by_full_scan(rows, now=now, limit=limit)
    # It stops at the first due row beyond the limit, and not before.
    due = [r for r in rows if r.state is S.PENDING and r.next_attempt_at <= now]
    if read < len(rows):
        assert len(planner.plan().send) == limit and len(due) > limit
