"""Which event loop `gateway serve` runs on, and running a coroutine on it.

uvloop (libuv under asyncio's API) costs about a quarter less CPU per request than the
standard library's loop here (docs/performance.md, change 20); the standard loop stays
available for platforms without uvloop and for comparison.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from gateway.errors import ConfigError

T = TypeVar("T")
EventLoopChoice = Literal["auto", "uvloop", "asyncio"]


def resolve(choice: EventLoopChoice) -> Literal["uvloop", "asyncio"]:
    """The loop `choice` means on this machine ("auto": uvloop where it is installed)."""
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        raise ConfigError(
            'server.event_loop = "uvloop", but uvloop is not installed', key="server.event_loop"
        )
    if choice == "auto":
        return "uvloop" if installed else "asyncio"
    return choice


def running() -> str:
    """The name of the package whose loop runs this code: "uvloop" or "asyncio"."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop]:
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    # The platform's own loop, even where a uvloop policy was installed process-wide.
    return asyncio.DefaultEventLoopPolicy().new_event_loop


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice) -> T:
    """`asyncio.run(main)`, on the loop `choice` names."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
