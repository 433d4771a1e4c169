"""A private certificate authority for tests: a CA, a server certificate for 127.0.0.1 and
a client certificate, written as PEM files (trustme makes them)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def issue(cls, folder: Path) -> Certificates:
        folder.mkdir(parents=True, exist_ok=True)
        authority = trustme.CA()
        server = authority.issue_cert("127.0.0.1", "localhost")
        client = authority.issue_cert("gateway@example.test")
        files = cls(
            ca=folder / "ca.pem",
            server_cert=folder / "server.pem",
            server_key=folder / "server.key",
            client_cert=folder / "client.pem",
            client_key=folder / "client.key",
        )
        authority.cert_pem.write_to_path(str(files.ca))
        server.private_key_pem.write_to_path(str(files.server_key))
        client.private_key_pem.write_to_path(str(files.client_key))
        for blob in server.cert_chain_pems:
            blob.write_to_path(str(files.server_cert), append=True)
        for blob in client.cert_chain_pems:
            blob.write_to_path(str(files.client_cert), append=True)
        return files

    def sink_options(self, *, client: bool = True) -> dict[str, str]:
        """A sink's TLS settings: trust this CA and, with `client`, present its client cert."""
        options = {"ca_file": str(self.ca)}
        if client:
            options |= {"cert_file": str(self.client_cert), "key_file": str(self.client_key)}
        return options

    def client_context(self) -> ssl.SSLContext:
        """For a test's own clients: trusts this CA and presents the client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context
