"""Running gateways for tests: in-process (fast) and as a real process (to kill it).

Both listen on 127.0.0.1 on a free UDP port with a database in the test's temp dir.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code

from gateway.config import GatewayConfig, config_from_mapping
from tests.support.downstreams import free_udp_port

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The event loop in-process tests run on: asyncio's own, unless TEST_EVENT_LOOP=uvloop
#: (`make test` runs the suite on both; uvloop is what `gateway serve` picks by default).
ON_UVLOOP = os.environ.get("TEST_EVENT_LOOP", "asyncio") == "uvloop"


def gateway_config(tmp_path: Path, **sections: dict[str, Any]) -> GatewayConfig:
    """A config for a test gateway; `sections` override keys, e.g. ingest={"max_payload": 64}."""
    data: dict[str, Any] = {
        "server": {"bind": "127.0.0.1", "port": free_udp_port()},
        "store": {"path": str(tmp_path / "gateway.db")},
        "registry": {"expiry_interval": 0.2},
        # Time-compressed tests post hundreds of readings a second from one device; the
        # rate limits are tested on their own in tests/security with explicit settings.
        "security": {"source_rate": 0, "device_rate": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data[section] = {**data.get(section, {}), **values}
        else:
            data[section] = values
    return config_from_mapping(data)


def base_url(config: GatewayConfig) -> str:
    return f"coap://127.0.0.1:{config.server.port}"


async def wait_until(
    predicate: Callable[[], Any], *, within: float = 5.0, interval: float = 0.02
) -> Any:
    """Poll `predicate` (sync or async) until truthy; fail with a clear message on timeout."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


async def register(
    client: aiocoap.Context,
    url: str,
    name: str,
    device_type: str = "fridge",
    *,
    lifetime: int = 300,
    links: bytes = b"",
    queue_mode: bool = False,
) -> str:
    """Register a device; returns its registration path (`rd/<id>`)."""
    uri = f"{url}/rd?ep={name}&et={device_type}&lt={lifetime}" + ("&q" if queue_mode else "")
    request = aiocoap.Message(code=Code.POST, uri=uri, payload=links)
    if links:
        request.opt.content_format = 40
    response = await client.request(request).response
    assert response.code == Code.CREATED, (response.code, response.payload)
    return "/".join(response.opt.location_path)


async def post(
    client: aiocoap.Context, url: str, path: str, payload: bytes, content_format: int | None = 60
) -> aiocoap.Message:
    request = aiocoap.Message(code=Code.POST, uri=f"{url}/{path}", payload=payload)
    if content_format is not None:
        request.opt.content_format = content_format
    return await client.request(request).response


class GatewayProcess:
    """`python -m gateway serve` as a child process, its JSON log lines collected."""

    @classmethod
    def with_settings(
        cls, config: GatewayConfig, tmp_path: Path, toml: str, *, workers: int = 1
    ) -> GatewayProcess:
        """One whose config file holds `toml`: what its command line does not carry (bind,
        port and database come from `config`)."""
        config_file = tmp_path / "gateway.toml"
        config_file.write_text(toml)
        return cls(config, config_file=config_file, workers=workers)

    def __init__(
        self, config: GatewayConfig, *, config_file: Path | None = None, workers: int = 1
    ) -> None:
        self.config = config
        self.config_file = config_file
        self.workers = workers
        self.url = base_url(config)
        self.events: list[dict[str, Any]] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def start(self, *, timeout: float = 15.0) -> None:
        command = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--bind",
            self.config.server.bind,
            "--port",
            str(self.config.server.port),
            "--db",
            self.config.store.path,
            "--log-format",
            "json",
        ]
        if self.config_file is not None:
            command += ["--config", str(self.config_file)]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        started = len(self.events_named("gateway.started"))
        self._process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        threading.Thread(target=self._read, args=(self._process,), daemon=True).start()
        self.wait_for_event("gateway.started", count=started + self.workers, timeout=timeout)

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "raw", "text": raw.decode(errors="replace").rstrip()}
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        process.stderr.close()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def worker_pid(self, index: int) -> int:
        """The process id of worker `index` as last started (several workers)."""
        started = [e for e in self.events_named("worker.started") if e["worker"] == index]
        return int(started[-1]["pid"])

    def events_named(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [event for event in self.events if event.get("event") == name]

    def wait_for_event(self, name: str, *, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(1 for e in self.events if e.get("event") == name) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self._process is not None and self._process.poll() is not None
                ):
                    tail = "\n".join(json.dumps(e) for e in self.events[-20:])
                    raise AssertionError(f"no {name!r} event from the gateway; last logs:\n{tail}")
                self._changed.wait(min(remaining, 0.1))

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up, like a power cut to the process."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)

    def terminate(self, *, timeout: float = 15.0) -> int:
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        return self._process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.running:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()
