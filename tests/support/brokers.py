"""Real brokers for tests: mosquitto and nats-server started from their binaries.

Each runs on a free loopback port in its own temporary directory. `start()` waits (polling
with a deadline) until the broker accepts connections; `stop()` kills it; `start()` again
brings it back on the same port, so a test can take a downstream away and return it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

MOSQUITTO = "/usr/sbin/mosquitto"
NATS_SERVER = "/usr/sbin/nats-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int, banner: bytes | None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if banner is None:
                return True
            sock.settimeout(1.0)
            return sock.recv(len(banner)) == banner
    except OSError:
        return False


class Broker:
    """A broker process on a fixed port; subclasses say how to run it."""

    banner: bytes | None = None

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "broker.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    @classmethod
    @contextlib.contextmanager
    def running_in(cls, parent: Path, name: str) -> Iterator[Self]:
        """A started broker in its own folder under `parent`, always stopped afterwards."""
        workdir = parent / name
        workdir.mkdir()
        broker = cls(workdir)
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        while not _accepts(self.port, self.banner):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command()[0]} exited: {self.log_path.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.command()[0]} did not listen on {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


class Mosquitto(Broker):
    def command(self) -> list[str]:
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stdout\n"
        )
        return [MOSQUITTO, "-c", str(config)]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class NatsServer(Broker):
    banner = b"INFO "

    def command(self) -> list[str]:
        store = self.workdir / "jetstream"
        store.mkdir(exist_ok=True)
        return [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"
