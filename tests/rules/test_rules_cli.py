"""`gateway rules list`, `gateway alerts list|ack`, `gateway shopping-list show`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiocoap
from click.testing import CliRunner

from gateway.app import Gateway
from gateway.cli import main
from gateway.config import GatewayConfig
from tests.rules.conftest import EXAMPLE, T0, Clock, Devices, example_rules
from tests.support.gateway import gateway_config


def make_story(config: GatewayConfig) -> None:
    """A lamp that failed and one that recovered; a fridge short of milk and eggs."""

    async def story() -> None:
        clock = Clock()
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            async with Gateway(config, clock=clock) as gateway:
                devices = Devices(gateway, client, clock)
                await devices.register("lamp-1", "streetlight")
                await devices.send("lamp-1", {"lamp_ok": False}, at=T0 + 1)
                await devices.send("lamp-1", {"lamp_ok": True}, at=T0 + 2)
                await devices.register("lamp-2", "streetlight")
                await devices.send("lamp-2", {"lamp_ok": False}, at=T0 + 3)
                await devices.register("fridge", "fridge")
                await devices.send("fridge", {"stock_milk": 1, "stock_eggs": 2}, at=T0 + 4)
        finally:
            await client.shutdown()

    asyncio.run(story())


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "240"}).invoke(main, list(args))
    return result.exit_code, result.output


def test_alerts_and_shopping_list_commands(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, rules=example_rules())  # type: ignore[arg-type]
    make_story(config)
    db = config.store.path

    code, out = invoke("alerts", "list", "--db", db, "--json")
    assert code == 0
    alerts = json.loads(out)
    assert [(a["device"], a["state"]) for a in alerts] == [
        ("lamp-2", "open"),
        ("lamp-1", "cleared"),
    ]
    code, out = invoke("alerts", "list", "--db", db, "--open", "--json")
    assert [a["device"] for a in json.loads(out)] == ["lamp-2"]
    code, out = invoke("alerts", "list", "--db", db, "--device", "lamp-1", "--json")
    assert [a["device"] for a in json.loads(out)] == ["lamp-1"]
    code, out = invoke("alerts", "list", "--db", db)
    assert code == 0 and "lamp failure" in out and "2 alerts" in out

    open_id = alerts[0]["id"]
    code, out = invoke("alerts", "ack", str(open_id), "--db", db)
    assert code == 0, out
    code, out = invoke("alerts", "list", "--db", db, "--open", "--json")
    (acked,) = json.loads(out)
    assert acked["acknowledged_at"] is not None and acked["state"] == "open"
    code, out = invoke("alerts", "ack", "9999", "--db", db)
    assert code == 3

    code, out = invoke("shopping-list", "show", "fridge", "--db", db, "--json")
    assert code == 0
    document = json.loads(out)
    assert document["list"] == "fridge"
    assert [(i["item"], i["level"], i["minimum"]) for i in document["items"]] == [
        ("eggs", 2, 6),
        ("milk", 1, 2),
    ]
    code, out = invoke("shopping-list", "show", "fridge", "--db", db)
    assert code == 0 and "milk" in out and "eggs" in out
    code, out = invoke("shopping-list", "show", "nothing", "--db", db, "--json")
    assert json.loads(out) == {"list": "nothing", "items": []}


def test_rules_list_shows_the_configured_rules() -> None:
    code, out = invoke("rules", "list", "--config", str(EXAMPLE), "--json")
    assert code == 0, out
    rules = json.loads(out)
    assert [r["name"] for r in rules] == [r["name"] for r in example_rules()]
    warm = rules[0]
    assert (warm["kind"], warm["above"], warm["for_seconds"]) == ("threshold", 8.0, 300.0)
    code, out = invoke("rules", "list", "--config", str(EXAMPLE))
    assert code == 0 and "tracker-left-home" in out and "geofence" in out


def test_ack_without_a_database_fails_cleanly(tmp_path: Path) -> None:
    code, out = invoke("alerts", "ack", "1", "--db", str(tmp_path / "none.db"))
    assert code == 1 and "not found" in out
    assert not (tmp_path / "none.db").exists()
