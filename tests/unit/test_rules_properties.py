"""Properties of the alert lifecycle over arbitrary reading sequences (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.rules import (
    AlertCleared,
    AlertEvent,
    AlertRaised,
    AlertRenotified,
    Decision,
    RateRule,
    RuleConfig,
    RuleEngine,
    SilenceRule,
    StateRule,
    ThresholdRule,
)

ABOVE = 8.0


@dataclass(frozen=True)
class Reading:
    gap: float
    device: str
    value: float


@dataclass(frozen=True)
class Tick:
    gap: float


gaps = st.floats(0, 400, allow_nan=False)
devices = st.sampled_from(["fridge-1", "fridge-2"])


@given(
    hysteresis=st.floats(0.1, 5),
    for_seconds=st.sampled_from([0.0, 30.0, 300.0]),
    fractions=st.lists(st.tuples(gaps, st.floats(-0.999, 1.0)), min_size=1, max_size=60),
    tick_each=st.booleans(),
)
def test_oscillation_within_the_hysteresis_band_raises_at_most_once(
    hysteresis: float, for_seconds: float, fractions: list[tuple[float, float]], tick_each: bool
) -> None:
    rule = ThresholdRule(
        name="warm",
        measurement="temp",
        above=ABOVE,
        hysteresis=hysteresis,
        for_seconds=for_seconds,
    )
    engine = RuleEngine([rule])
    decisions: list[Decision] = []
    now = 0.0
    for gap, fraction in fractions:
        now += gap
        # Strictly inside (threshold - hysteresis, threshold + hysteresis].
        value = ABOVE + fraction * hysteresis
        decisions += engine.evaluate({"temp": value}, "fridge-1", "fridge", now)
        if tick_each:
            decisions += engine.tick(now + gap / 2)
    assert sum(isinstance(d, AlertRaised) for d in decisions) <= 1
    assert not any(isinstance(d, AlertCleared) for d in decisions)


def _rules(renotify: float, for_seconds: float) -> list[RuleConfig]:
    timing = {"renotify_interval": renotify, "for_seconds": for_seconds}
    return [
        ThresholdRule(name="warm", measurement="temp", above=ABOVE, hysteresis=1.0, **timing),
        ThresholdRule(name="cold", measurement="temp", below=0.0, **timing),
        RateRule(name="rising", measurement="temp", per_minute=0.5, window=120, **timing),
        StateRule(name="freezing", measurement="temp", equals=-5.0, **timing),
        SilenceRule(name="silent", interval=120, renotify_interval=renotify),
    ]


events = st.lists(
    st.one_of(
        st.builds(Reading, gaps, devices, st.floats(-10, 20).map(lambda v: round(v, 1))),
        st.builds(Tick, gaps),
    ),
    max_size=80,
)


@settings(max_examples=200)
@given(
    renotify=st.sampled_from([0.0, 60.0, 600.0]),
    for_seconds=st.sampled_from([0.0, 60.0]),
    script=events,
)
def test_lifecycle_invariants_over_arbitrary_sequences(
    renotify: float, for_seconds: float, script: list[Reading | Tick]
) -> None:
    engine = RuleEngine(_rules(renotify, for_seconds))
    now = 0.0
    open_since: dict[tuple[str, str], float] = {}
    last_notified: dict[tuple[str, str], float] = {}
    for event in script:
        now += event.gap
        if isinstance(event, Reading):
            decisions = engine.evaluate({"temp": event.value}, event.device, "fridge", now)
        else:
            decisions = engine.tick(now)
        for decision in decisions:
            assert isinstance(decision, AlertEvent)
            key = (decision.rule, decision.device)
            if isinstance(decision, AlertRaised):
                # Never two open alerts per rule and device.
                assert key not in open_since
                open_since[key] = decision.at
                last_notified[key] = decision.at
            elif isinstance(decision, AlertRenotified):
                assert key in open_since and renotify > 0
                assert decision.at - last_notified[key] >= renotify
                assert decision.raised_at == open_since[key]
                last_notified[key] = decision.at
            else:
                # Every clear follows a raise of the same alert.
                assert isinstance(decision, AlertCleared)
                assert open_since.pop(key) == decision.raised_at
        assert {(a.rule, a.device) for a in engine.open_alerts()} == set(open_since)
