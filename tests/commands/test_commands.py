"""Commands reach online devices at once and sleepy ones in their wake window."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from gateway.commands import store
from gateway.core.commands import CommandRequest
from tests.support.devices import FakeDevice
from tests.support.gateway import REPO_ROOT, GatewayProcess, base_url, gateway_config, wait_until


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
async def light() -> AsyncIterator[FakeDevice]:
    device = FakeDevice("light-1", "streetlight", {"on": True, "dim": 80})
    await device.start()
    try:
        yield device
    finally:
        await device.stop()


@pytest.fixture
async def tracker() -> AsyncIterator[FakeDevice]:
    device = FakeDevice("tracker-1", "tracker", {"battery": 90})
    await device.start()
    try:
        yield device
    finally:
        await device.stop()


async def command(gateway: Gateway, command_id: int) -> store.CommandRow:
    row = await store.get_command(gateway.reader, command_id)
    assert row is not None
    return row


async def state_is(gateway: Gateway, command_id: int, state: str) -> bool:
    return (await command(gateway, command_id)).state == state


async def test_dim_command_to_online_street_light_is_applied(
    gateway: Gateway, light: FakeDevice
) -> None:
    await light.register(base_url(gateway.config), links=b"</light>")
    command_id = await gateway.commands.submit(
        "light-1", CommandRequest("PUT", "/light", cbor2.dumps({"dim": 30}), 60)
    )
    await wait_until(lambda: state_is(gateway, command_id, "acknowledged"))
    assert light.state["dim"] == 30
    row = await command(gateway, command_id)
    assert row.as_dict()["response"] == {"code": "2.04", "payload": {"ok": True}}
    assert row.attempts == 1


async def test_upstream_posts_command_over_coap(
    gateway: Gateway, light: FakeDevice, coap_client: aiocoap.Context
) -> None:
    url = base_url(gateway.config)
    await light.register(url, links=b"</light>")
    body = cbor2.dumps({"path": "/light", "method": "PUT", "payload": {"dim": 10}, "ttl": 60})
    request = aiocoap.Message(code=Code.POST, uri=f"{url}/cmd/light-1", payload=body)
    request.opt.content_format = 60
    response = await coap_client.request(request).response
    assert response.code == Code.CREATED
    location = "/".join(response.opt.location_path)
    assert location.startswith("cmd/light-1/")

    async def status() -> Any:
        get = aiocoap.Message(code=Code.GET, uri=f"{url}/{location}")
        return cbor2.loads((await coap_client.request(get).response).payload)

    document = await wait_until(lambda: _acknowledged(status))
    assert document["response"]["code"] == "2.04"
    assert light.state["dim"] == 10
    unknown = aiocoap.Message(code=Code.POST, uri=f"{url}/cmd/nobody", payload=body)
    unknown.opt.content_format = 60
    assert (await coap_client.request(unknown).response).code == Code.NOT_FOUND


async def _acknowledged(status: Any) -> Any:
    document = await status()
    return document if document["state"] == "acknowledged" else None


async def test_command_to_sleeping_tracker_waits_for_wake_window(
    gateway: Gateway, tracker: FakeDevice
) -> None:
    url = base_url(gateway.config)
    await tracker.register(url, queue_mode=True, links=b"</light>")
    await asyncio.sleep(gateway.config.commands.wake_window + 0.1)  # let the window close
    command_id = await gateway.commands.submit(
        "tracker-1", CommandRequest("POST", "/light", cbor2.dumps({"report": 60}), 60)
    )
    # Not sent while the tracker sleeps, across several dispatcher looks at the queue.
    await asyncio.sleep(3 * gateway.config.commands.poll_interval)
    assert tracker.commands == []
    assert await state_is(gateway, command_id, "queued")

    response = await tracker.update(url)  # it wakes up and refreshes its registration
    assert response.code == Code.CHANGED
    await wait_until(lambda: state_is(gateway, command_id, "acknowledged"))
    assert tracker.state["report"] == 60


async def test_reading_opens_wake_window(gateway: Gateway, tracker: FakeDevice) -> None:
    url = base_url(gateway.config)
    await tracker.register(url, queue_mode=True, links=b"")
    await asyncio.sleep(gateway.config.commands.wake_window + 0.1)
    command_id = await gateway.commands.submit("tracker-1", CommandRequest("PUT", "/light"))
    await asyncio.sleep(3 * gateway.config.commands.poll_interval)
    assert await state_is(gateway, command_id, "queued")
    assert (await tracker.post_reading(url, {"battery": 80})).code == Code.CHANGED
    await wait_until(lambda: state_is(gateway, command_id, "acknowledged"))


async def test_expired_command_is_never_sent(gateway: Gateway, tracker: FakeDevice) -> None:
    url = base_url(gateway.config)
    await tracker.register(url, queue_mode=True, links=b"")
    await asyncio.sleep(gateway.config.commands.wake_window + 0.1)
    command_id = await gateway.commands.submit(
        "tracker-1", CommandRequest("PUT", "/light", ttl=0.5)
    )
    await wait_until(lambda: state_is(gateway, command_id, "expired"))
    await tracker.update(url)
    later = await gateway.commands.submit("tracker-1", CommandRequest("PUT", "/light"))
    await wait_until(lambda: state_is(gateway, later, "acknowledged"))
    assert len(tracker.commands) == 1  # only the later one
    assert (await command(gateway, command_id)).sent_at is None


async def test_unanswered_command_is_retried_then_failed(tmp_path: Path, light: FakeDevice) -> None:
    config = gateway_config(
        tmp_path, commands={"response_timeout": 0.3, "max_attempts": 2, "poll_interval": 0.1}
    )
    light.answer = False
    async with Gateway(config) as gateway:
        await light.register(base_url(config), links=b"")
        command_id = await gateway.commands.submit("light-1", CommandRequest("PUT", "/light"))
        await wait_until(lambda: state_is(gateway, command_id, "failed"))
        row = await command(gateway, command_id)
        assert row.attempts == 2 and row.error is not None and "no answer" in row.error


async def test_cli_send_list_and_restart_keeps_queued_commands(
    tmp_path: Path, tracker: FakeDevice
) -> None:
    config = gateway_config(tmp_path, commands={"wake_window": 1.0})
    process = first = GatewayProcess(config)
    db = config.store.path
    try:
        process.start()
        url = base_url(config)
        await tracker.register(url, queue_mode=True, links=b"")
        sent = cli(
            "command",
            "send",
            "tracker-1",
            "/light",
            "--payload-json",
            '{"report": 30}',
            "--db",
            db,
            "--json",
        )
        assert sent.returncode == 0, sent.stderr
        command_id = json.loads(sent.stdout)["id"]
        unknown = cli("command", "send", "nobody", "/light", "--db", db)
        assert unknown.returncode == 3
        first.terminate()

        # Re-registering after the restart does not empty the queue.
        process = GatewayProcess(config)
        process.start()
        await asyncio.sleep(1.1)
        listed = cli("command", "list", "--device", "tracker-1", "--db", db, "--json")
        assert [c["state"] for c in json.loads(listed.stdout)] == ["queued"]
        await tracker.register(url, queue_mode=True, links=b"")
        await wait_until(lambda: bool(tracker.commands), within=10)

        def acknowledged() -> bool:
            rows = json.loads(cli("command", "list", "--db", db, "--json").stdout)
            return rows[0]["state"] == "acknowledged"

        await wait_until(acknowledged, within=10)
        rows = json.loads(cli("command", "list", "--db", db, "--json").stdout)
        assert rows[0]["id"] == command_id
        assert rows[0]["payload"] == {"report": 30}
        assert tracker.state["report"] == 30
        table = cli("command", "list", "--db", db)
        assert "acknowledged" in table.stdout
    finally:
        process.stop()
        first.stop()
