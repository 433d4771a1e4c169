"""The alert lifecycle: one table of moves, per rule and device, over values and times.

A rule turns readings into a condition (true, false, or unknown when a reading says nothing
about it). The lifecycle turns that condition into at most one open alert per rule and device:

    idle --true--> pending --true, held for_seconds--> raised --false--> idle (cleared)
      \\---------true, for_seconds == 0---------------/   |  ^
                                                          +--+ true, renotify_interval passed

Every phase has one timer, checked with the condition: in idle and pending it asks whether the
condition has held for ``for_seconds``; in raised whether ``renotify_interval`` has passed
since the last notification (0 never re-notifies). An unknown condition moves nothing.
Whether an alert was acknowledged is the shell's business, not the lifecycle's.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

Value = bool | int | float | str


class Phase(enum.StrEnum):
    IDLE = "idle"
    PENDING = "pending"
    RAISED = "raised"


class Action(enum.StrEnum):
    NONE = "none"
    RAISE = "raise"
    RENOTIFY = "renotify"
    CLEAR = "clear"


#: (phase, condition, timer due) -> (next phase, action). Every combination is listed.
TRANSITIONS: Mapping[tuple[Phase, bool, bool], tuple[Phase, Action]] = {
    (Phase.IDLE, False, False): (Phase.IDLE, Action.NONE),
    (Phase.IDLE, False, True): (Phase.IDLE, Action.NONE),
    (Phase.IDLE, True, False): (Phase.PENDING, Action.NONE),
    (Phase.IDLE, True, True): (Phase.RAISED, Action.RAISE),
    (Phase.PENDING, False, False): (Phase.IDLE, Action.NONE),
    (Phase.PENDING, False, True): (Phase.IDLE, Action.NONE),
    (Phase.PENDING, True, False): (Phase.PENDING, Action.NONE),
    (Phase.PENDING, True, True): (Phase.RAISED, Action.RAISE),
    (Phase.RAISED, False, False): (Phase.IDLE, Action.CLEAR),
    (Phase.RAISED, False, True): (Phase.IDLE, Action.CLEAR),
    (Phase.RAISED, True, False): (Phase.RAISED, Action.NONE),
    (Phase.RAISED, True, True): (Phase.RAISED, Action.RENOTIFY),
}


@dataclass
class AlertState:
    """What the lifecycle remembers for one rule and device. Plain data: copy it to persist."""

    device_type: str = ""
    phase: Phase = Phase.IDLE
    #: When the condition became true (pending and raised).
    since: float | None = None
    raised_at: float | None = None
    last_notified_at: float | None = None
    notify_count: int = 0
    #: The latest value the rule judged, and its message: what tick() re-uses.
    value: Value | None = None
    threshold: Value | None = None
    message: str = ""
    #: Time of the latest reading this rule evaluated for the device; older ones are ignored.
    last_at: float | None = None

    @property
    def active(self) -> bool:
        """Condition currently held true (pending or raised): hysteresis keys off this."""
        return self.phase is not Phase.IDLE


def timer_due(
    state: AlertState, at: float, *, for_seconds: float, renotify_interval: float
) -> bool:
    if state.phase is Phase.IDLE:
        return for_seconds <= 0
    if state.phase is Phase.PENDING:
        return state.since is not None and at - state.since >= for_seconds
    if renotify_interval <= 0 or state.last_notified_at is None:
        return False
    return at - state.last_notified_at >= renotify_interval


def step(
    state: AlertState,
    condition: bool,
    at: float,
    *,
    for_seconds: float,
    renotify_interval: float,
) -> Action:
    """Apply one condition at time `at` to `state` (in place); say what to announce."""
    due = timer_due(state, at, for_seconds=for_seconds, renotify_interval=renotify_interval)
    phase, action = TRANSITIONS[(state.phase, condition, due)]
    if phase is Phase.IDLE:
        state.since = state.raised_at = state.last_notified_at = None
        state.notify_count = 0
    elif state.phase is Phase.IDLE:
        state.since = at
    if action is Action.RAISE:
        state.raised_at = state.last_notified_at = at
        state.notify_count = 1
    elif action is Action.RENOTIFY:
        state.last_notified_at = at
        state.notify_count += 1
    state.phase = phase
    return action


@dataclass(frozen=True, kw_only=True)
class AlertEvent:
    """Common fields of every alert decision; stored with its time, device, rule and value."""

    rule: str
    #: The rule's kind ("threshold", "rate", ...).
    kind: str
    device: str
    device_type: str
    severity: str
    at: float
    value: Value | None
    threshold: Value | None
    message: str
    raised_at: float


@dataclass(frozen=True, kw_only=True)
class AlertRaised(AlertEvent):
    pass


@dataclass(frozen=True, kw_only=True)
class AlertRenotified(AlertEvent):
    #: How many notifications this alert has had, this one included (the raise was 1).
    count: int


@dataclass(frozen=True, kw_only=True)
class AlertCleared(AlertEvent):
    pass


@dataclass(frozen=True, kw_only=True)
class OpenAlert:
    """A raised, not yet cleared alert: what the shell stores to carry it across a restart."""

    rule: str
    device: str
    device_type: str
    raised_at: float
    last_notified_at: float
    notify_count: int
    value: Value | None
    threshold: Value | None
    message: str
