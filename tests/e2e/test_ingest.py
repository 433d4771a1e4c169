"""Registration and readings over real CoAP on loopback, read back over CoAP and the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from click.testing import CliRunner

from gateway.app import Gateway
from gateway.cli import main
from gateway.config import GatewayConfig
from tests.support.gateway import base_url, gateway_config, post, register, wait_until


async def get(client: aiocoap.Context, uri: str, accept: int | None = None) -> aiocoap.Message:
    request = aiocoap.Message(code=Code.GET, uri=uri)
    if accept is not None:
        request.opt.accept = accept
    return await client.request(request).response


async def cli(*args: str) -> object:
    # The CLI runs its own event loop, as it does for an operator: give it a thread.
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if "--json" in args else result.output


async def test_discovery_lists_the_resources(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    response = await get(coap_client, f"{gateway_url}/.well-known/core")
    assert response.code == Code.CONTENT
    links = response.payload.decode()
    assert '</rd>;rt="core.rd"' in links and "</r>" in links


async def test_register_post_every_format_and_read_back(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context, gateway_config: GatewayConfig
) -> None:
    location = await register(coap_client, gateway_url, "fridge-1", "fridge", links=b"</temp>;obs")
    assert location.startswith("rd/")

    bodies = [
        (cbor2.dumps({"temp": 4.5, "door": False, "seq": 1}), 60),
        (cbor2.dumps([{0: "stock_milk", 2: 2, 6: 1_800_000_000}]), 112),
        (json.dumps({"setpoint": 4, "seq": 2}).encode(), 50),
        (json.dumps([{"n": "compressor", "vb": True}]).encode(), 110),
    ]
    for payload, cf in bodies:
        response = await post(coap_client, gateway_url, "r/fridge-1", payload, cf)
        assert response.code == Code.CHANGED, response.payload

    response = await get(coap_client, f"{gateway_url}/r/fridge-1")
    assert response.code == Code.CONTENT and response.opt.content_format == 60
    latest = cbor2.loads(response.payload)
    assert {name: entry["v"] for name, entry in latest.items()} == {
        "temp": 4.5,
        "door": False,
        "stock_milk": 2,
        "setpoint": 4,
        "compressor": True,
    }
    assert latest["temp"]["u"] == "Cel" and latest["stock_milk"]["t"] == 1_800_000_000

    as_json = await get(coap_client, f"{gateway_url}/r/fridge-1", accept=50)
    assert json.loads(as_json.payload)["door"]["v"] is False

    db = gateway_config.store.path
    rows = await cli("readings", "list", "--device", "fridge-1", "--db", db, "--json")
    assert isinstance(rows, list) and len(rows) == 5
    assert {row["measurement"] for row in rows} == set(latest)
    devices = await cli("devices", "list", "--db", db, "--json")
    assert isinstance(devices, list)
    assert [(d["name"], d["type"], d["online"]) for d in devices] == [("fridge-1", "fridge", True)]
    assert "temp" in str(await cli("devices", "show", "fridge-1", "--db", db))


async def test_retried_readings_are_stored_once(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "tracker-1", "tracker")
    payload = cbor2.dumps({"lat": 48.85, "lon": 2.35, "seq": 41})
    for _ in range(3):  # a device whose ACK got lost sends the same reading again
        assert (await post(coap_client, gateway_url, "r/tracker-1", payload)).code == Code.CHANGED
    senml = cbor2.dumps([{-2: "tracker-1:", -3: 1_800_000_000, 0: "battery", 2: 80}])
    for _ in range(2):
        assert (
            await post(coap_client, gateway_url, "r/tracker-1", senml, 112)
        ).code == Code.CHANGED
    async with gateway.reader.execute("SELECT measurement, count(*) FROM readings GROUP BY 1") as c:
        counts = dict(await c.fetchall())  # type: ignore[arg-type]
    assert counts == {"lat": 1, "lon": 1, "battery": 1}


async def test_registration_update_remove_and_replace(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    location = await register(coap_client, gateway_url, "light-1", "streetlight")
    update = aiocoap.Message(code=Code.POST, uri=f"{gateway_url}/{location}?lt=600")
    assert (await coap_client.request(update).response).code == Code.CHANGED

    again = await register(coap_client, gateway_url, "light-1", "streetlight")  # a reboot
    assert again != location
    stale = aiocoap.Message(code=Code.POST, uri=f"{gateway_url}/{location}")
    assert (await coap_client.request(stale).response).code == Code.NOT_FOUND

    delete = aiocoap.Message(code=Code.DELETE, uri=f"{gateway_url}/{again}")
    assert (await coap_client.request(delete).response).code == Code.DELETED
    async with gateway.reader.execute("SELECT online FROM devices WHERE name='light-1'") as c:
        assert (await c.fetchone()) == (0,)


async def test_expired_registration_marks_the_device_offline(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "sleepy", "tracker", lifetime=10)

    async def offline() -> bool:
        async with gateway.reader.execute("SELECT online FROM devices WHERE name='sleepy'") as c:
            return (await c.fetchone()) == (0,)

    # Lifetimes are at least 10 s by default; move the registration's expiry into the past.
    await gateway.writer.transaction(
        lambda conn: conn.execute("UPDATE registrations SET expires_at = 0")
    )
    await wait_until(offline, within=5)


@pytest.mark.parametrize(
    ("path", "payload", "cf", "code", "text"),
    [
        ("r/fridge-2", b"\xa1\x64te", 60, Code.BAD_REQUEST, "malformed CBOR"),
        ("r/fridge-2", b"{nope", 50, Code.BAD_REQUEST, "malformed JSON"),
        (
            "r/fridge-2",
            cbor2.dumps({"temp": 1}),
            0,
            Code.UNSUPPORTED_CONTENT_FORMAT,
            "content-format",
        ),
        ("r/fridge-2", cbor2.dumps({"temp": 99}), 60, Code.UNPROCESSABLE_ENTITY, "temp"),
        ("r/fridge-2", cbor2.dumps({"door": 3}), 60, Code.UNPROCESSABLE_ENTITY, "door"),
        (
            "r/fridge-2",
            cbor2.dumps({f"f{i}": i for i in range(65)}),
            60,
            Code.UNPROCESSABLE_ENTITY,
            "too many",
        ),
        ("r/ghost", cbor2.dumps({"temp": 1}), 60, Code.NOT_FOUND, "unknown device"),
        ("rd?et=fridge", b"", None, Code.BAD_REQUEST, "ep"),
        ("rd?ep=x&lt=1", b"", None, Code.BAD_REQUEST, "lt"),
    ],
)
async def test_errors_get_their_code_and_a_diagnostic(
    gateway: Gateway,
    gateway_url: str,
    coap_client: aiocoap.Context,
    path: str,
    payload: bytes,
    cf: int | None,
    code: Code,
    text: str,
) -> None:
    await register(coap_client, gateway_url, "fridge-2", "fridge")
    response = await post(coap_client, gateway_url, path, payload, cf)
    assert response.code == code
    assert text in response.payload.decode()
    async with gateway.reader.execute("SELECT count(*) FROM readings") as cursor:
        assert (await cursor.fetchone()) == (0,)
    # ... and the gateway keeps serving.
    good = await post(coap_client, gateway_url, "r/fridge-2", cbor2.dumps({"temp": 5}))
    assert good.code == Code.CHANGED


async def test_oversized_payload_gets_4_13_with_size1(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, ingest={"max_payload": 64})
    url = base_url(config)
    async with Gateway(config):
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            await register(client, url, "big", "generic")
            response = await post(client, url, "r/big", cbor2.dumps({"note": "x" * 100}))
            assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
            assert response.opt.size1 == 64
        finally:
            await client.shutdown()


async def test_auto_register_accepts_unknown_devices(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, ingest={"auto_register": True})
    url = base_url(config)
    async with Gateway(config) as running:
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            response = await post(client, url, "r/newcomer", cbor2.dumps({"x": 1}))
            assert response.code == Code.CHANGED
        finally:
            await client.shutdown()
        assert running.registry.device("newcomer") is not None


async def test_get_unknown_device_and_unacceptable_format(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    assert (await get(coap_client, f"{gateway_url}/r/nobody")).code == Code.NOT_FOUND
    await register(coap_client, gateway_url, "fridge-3", "fridge")
    assert (
        await get(coap_client, f"{gateway_url}/r/fridge-3", accept=0)
    ).code == Code.NOT_ACCEPTABLE


async def test_dual_stack_bind_serves_ipv4_and_ipv6(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, server={"bind": "::"})
    port = config.server.port
    async with Gateway(config):
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            for host in ("127.0.0.1", "[::1]"):
                url = f"coap://{host}:{port}"
                await register(client, url, f"dev-{len(host)}", "generic")
                response = await post(client, url, f"r/dev-{len(host)}", cbor2.dumps({"x": 1}))
                assert response.code == Code.CHANGED
        finally:
            await client.shutdown()


async def test_export_csv_and_json(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context, tmp_path: Path
) -> None:
    await register(coap_client, gateway_url, "exp", "tracker")
    for seq in range(5):
        payload = cbor2.dumps({"battery": 90 - seq, "seq": seq})
        assert (await post(coap_client, gateway_url, "r/exp", payload)).code == Code.CHANGED
    db = gateway.config.store.path
    out = tmp_path / "out.csv"
    await cli("readings", "export", "--format", "csv", "-o", str(out), "--db", db)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("id,device,device_type,measurement,value")
    assert len(lines) == 6 and lines[-1].split(",")[4] == "86"
    result = await asyncio.to_thread(
        CliRunner().invoke, main, ["readings", "export", "--format", "json", "--db", db]
    )
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [r["value"] for r in records] == [90, 89, 88, 87, 86]


async def test_cli_exit_codes(gateway: Gateway) -> None:
    db = gateway.config.store.path
    runner = CliRunner()
    missing = await asyncio.to_thread(runner.invoke, main, ["devices", "show", "nope", "--db", db])
    assert missing.exit_code == 3
    no_db = await asyncio.to_thread(
        runner.invoke, main, ["devices", "list", "--db", "/nonexistent/x.db"]
    )
    assert no_db.exit_code == 1 and "database not found" in no_db.output
    usage = await asyncio.to_thread(runner.invoke, main, ["readings", "list", "--limit", "0"])
    assert usage.exit_code == 2
