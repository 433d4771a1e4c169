"""Loading configuration: TOML, environment overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.config import load_config
from gateway.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_file_then_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[store]\npath = "a.db"\n[ingest]\nmax_payload = 2048\n')
    config = load_config(
        path, environ={"GATEWAY_STORE_PATH": "b.db", "GATEWAY_SERVER_PORT": "6000"}
    )
    assert (config.store.path, config.ingest.max_payload, config.server.port) == (
        "b.db",
        2048,
        6000,
    )


def test_defaults_without_a_file() -> None:
    config = load_config(None, environ={})
    assert (config.server.port, config.store.path, config.ingest.max_payload) == (
        5683,
        "var/gateway.db",
        1024,
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[store]\nmax_batch = 'x'\n", "store.max_batch"),
        ("[store]\nwal_autocheckpoint = 0\n", "store.wal_autocheckpoint"),
        ("[stor]\n", "stor"),
        ("[ingest]\nauto_registr = true\n", "ingest.auto_registr"),
        ("[server]\nport = 70000\n", "server.port"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert caught.value.key == key


def test_config_check_command(tmp_path: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(main, ["config", "check", str(write(tmp_path, "[server]\nport = 1\n"))])
    assert good.exit_code == 0 and "valid" in good.output
    bad = runner.invoke(main, ["config", "check", "--json", str(write(tmp_path, "[x]\n"))])
    assert bad.exit_code == 1 and '"key": "x"' in bad.output


def test_shipped_example_is_valid() -> None:
    load_config(Path(__file__).parents[2] / "docs" / "examples" / "gateway.toml", environ={})
