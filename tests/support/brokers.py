"""Real brokers for tests: mosquitto and nats-server started from their binaries.

Each runs on a free loopback port in its own temporary directory. `start()` waits (polling
with a deadline) until the broker accepts connections; `stop()` kills it; `start()` again
brings it back on the same port, so a test can take a downstream away and return it.
"""

from __future__ import annotations

import contextlib
import getpass
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from tests.support.downstreams import free_port
from tests.support.tls import Certificates

MOSQUITTO = "/usr/sbin/mosquitto"
NATS_SERVER = "/usr/sbin/nats-server"


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

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        tls: Certificates | None = None,
        verify_clients: bool = False,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        #: Serve TLS with these certificates; with `verify_clients`, only to clients that
        #: present a certificate of the same authority.
        self.tls = tls
        self.verify_clients = verify_clients
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "broker.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    @classmethod
    @contextlib.contextmanager
    def running_in(cls, parent: Path, name: str, **options: Any) -> Iterator[Self]:
        """A started broker in its own folder under `parent`, always stopped afterwards."""
        workdir = parent / name
        workdir.mkdir()
        broker = cls(workdir, **options)
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
    #: An ACL file's text (mosquitto's `acl_file`): which topics clients may read and write.
    #: None: all of them. Read at each start, so a test can change it and restart.
    acl: str | None = None
    #: More lines for mosquitto.conf (a setting a test needs).
    extra: str = ""

    def command(self) -> list[str]:
        config = self.workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            "log_dest stdout",
        ]
        if self.tls is not None or self.acl is not None:
            # Run as root, mosquitto would switch to its own user, which may not read
            # the test's (private) temporary folder.
            lines += [f"user {getpass.getuser()}"]
        if self.acl is not None:
            acl = self.workdir / "acl"
            acl.write_text(self.acl)
            lines += [f"acl_file {acl}"]
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                f"require_certificate {'true' if self.verify_clients else 'false'}",
            ]
        config.write_text("\n".join(lines) + "\n" + self.extra)
        return [MOSQUITTO, "-c", str(config)]

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"


class NatsServer(Broker):
    banner = b"INFO "

    def command(self) -> list[str]:
        store = self.workdir / "jetstream"
        store.mkdir(exist_ok=True)
        argv = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)]
        if self.tls is not None:
            argv += ["--tls", "--tlscert", str(self.tls.server_cert)]
            argv += ["--tlskey", str(self.tls.server_key)]
            if self.verify_clients:
                argv += ["--tlsverify", "--tlscacert", str(self.tls.ca)]
        return argv

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"
