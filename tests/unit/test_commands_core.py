"""The command state table and the CoAP command description."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import config_from_mapping
from gateway.core.commands import (
    TRANSITIONS,
    CommandState,
    IllegalTransition,
    parse_command_description,
    transition,
)
from gateway.errors import DeviceError


@pytest.mark.parametrize("current", list(CommandState))
@pytest.mark.parametrize("target", list(CommandState))
def test_only_moves_in_the_table_are_allowed(current: CommandState, target: CommandState) -> None:
    if target in TRANSITIONS[current]:
        assert transition(current.value, target) is target
    else:
        with pytest.raises(IllegalTransition):
            transition(current.value, target)


def test_expired_and_settled_commands_never_move() -> None:
    for final in (CommandState.EXPIRED, CommandState.ACKNOWLEDGED, CommandState.FAILED):
        with pytest.raises(IllegalTransition):
            transition(final.value, CommandState.SENT)


def test_description_defaults_and_payload_encoding() -> None:
    command = parse_command_description(
        cbor2.dumps({"path": "/light", "payload": {"dim": 30}, "ttl": 60}), 60
    )
    assert (command.method, command.path, command.content_format, command.ttl) == (
        "PUT",
        "/light",
        60,
        60.0,
    )
    assert cbor2.loads(command.payload) == {"dim": 30}


@given(st.binary(max_size=64))
def test_arbitrary_bytes_give_a_command_or_a_device_error(payload: bytes) -> None:
    with contextlib.suppress(DeviceError):
        parse_command_description(payload, 60)


def test_config_sections() -> None:
    config = config_from_mapping(
        {
            "observe": {"paths": {"streetlight": ["/state"]}},
            "commands": {"wake_windows": {"tracker": 10}},
        }
    )
    assert config.observe.paths == {"streetlight": ("/state",)}
    assert config.commands.window("tracker") == 10 and config.commands.window("fridge") == 5
