"""Which event loop `gateway serve` runs on."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from gateway import eventloop
from gateway.errors import ConfigError
from tests.support.gateway import ON_UVLOOP


def test_auto_takes_uvloop_where_installed_and_asyncio_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert eventloop.resolve("auto") == "uvloop"
    assert eventloop.resolve("asyncio") == "asyncio"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert eventloop.resolve("auto") == "asyncio"
    with pytest.raises(ConfigError) as refused:
        eventloop.resolve("uvloop")
    assert refused.value.key == "server.event_loop"


@pytest.mark.parametrize(("choice", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_run_runs_on_the_chosen_loop(choice: eventloop.EventLoopChoice, module: str) -> None:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert eventloop.run(which(), choice) == module


async def test_the_suite_runs_on_the_loop_it_was_asked_for() -> None:
    """`make test` runs every test on both loops; a pytest-asyncio that stopped taking the
    process-wide policy would quietly run the second pass on asyncio's loop again."""
    running = type(asyncio.get_running_loop()).__module__.split(".")[0]
    assert running == ("uvloop" if ON_UVLOOP else "asyncio")
