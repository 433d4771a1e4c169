"""The device-sim command line, run as a subprocess like a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_sim.cli import load_scenario
from tests.support.downstreams import free_udp_port

ROOT = Path(__file__).resolve().parents[2]


def device_sim(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "device_sim", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def sink_port() -> Iterator[int]:
    port = free_udp_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_sim", "sink", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "listening" in proc.stderr.readline()  # blocks until the socket is bound
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize("args", [[], ["run"], ["sink"]])
def test_help_everywhere(args: list[str]) -> None:
    result = device_sim(*args, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_run_prints_a_json_summary_and_exits_0(sink_port: int) -> None:
    result = device_sim(
        "run", "--gateway", f"coap://127.0.0.1:{sink_port}", "--fridges", "3", "--trackers",
        "2", "--lights", "3", "--duration", "2", "--fridge-interval", "0.5",
        "--light-interval", "0.5", "--tracker-interval", "0.5", "--ramp", "0.2", "--seed",
        "42", "--json", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["devices_up"] == summary["devices"] == 8
    assert summary["sent"] >= 16 and summary["acknowledged"] == summary["sent"]
    assert summary["failed"] == 0 and summary["codes"] == {"2.04": summary["acknowledged"]}
    assert summary["latency_p99_ms"] is not None


def test_scenario_file_runs_with_flag_overrides(sink_port: int) -> None:
    result = device_sim(
        "run", "--scenario", "docs/examples/scenario.toml",
        "--gateway", f"coap://127.0.0.1:{sink_port}", "--fridges", "2", "--trackers", "0",
        "--lights", "2", "--duration", "1", "--ramp", "0.2", "--no-progress",
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr  # 5 % loss may fail the odd reading
    assert "devices up        4/4" in result.stdout


def test_unreachable_gateway_exits_1() -> None:
    port = free_udp_port()
    result = device_sim(
        "run", "--gateway", f"coap://127.0.0.1:{port}", "--fridges", "1", "--duration",
        "0.5", "--drain", "0.2", "--no-progress", "--json",
    )  # fmt: skip
    assert result.returncode == 1
    assert json.loads(result.stdout)["devices_up"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--duration", "1"],  # no devices
        ["run", "--fridges", "-1"],
        ["run", "--fridges", "1", "--gateway", "http://127.0.0.1:1"],
        ["run", "--fridges", "1", "--loss", "2"],
        ["run", "--scenario", "does-not-exist.toml"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = device_sim(*args)
    assert result.returncode == 2, result.stdout + result.stderr


def test_bad_scenario_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[fridges]\ncount = 'many'\n")
    result = device_sim("run", "--scenario", str(bad))
    assert result.returncode == 2 and "bad.toml" in result.stderr
    bad.write_text("fridgez = 3\n")
    assert device_sim("run", "--scenario", str(bad)).returncode == 2


def test_example_scenario_parses() -> None:
    sc = load_scenario(ROOT / "docs/examples/scenario.toml")
    assert sc.fridges.count == 50 and sc.impairment is not None and sc.impairment.loss == 0.05
