"""Several worker processes on one UDP port, each peer always served by the same worker.

With SO_REUSEPORT the kernel spreads datagrams over the sockets bound to a port by a hash
of the address pair that user space cannot compute, so a worker could not tell which
peers are its own. A CoAP conversation must stay in one process, though: a device answers
a command, or acknowledges a confirmable notification, to the port the gateway used, and
only the worker that sent the message knows its message ID. So the group gets a classic
BPF program (SO_ATTACH_REUSEPORT_CBPF) that picks the socket from the peer's address:

    worker = (last 32 bits of the source address + source port) mod workers

and `worker_for` computes the same in Python, so a worker knows whether a device's
address is its own before it sends to it. The sockets are made and bound, in order, by
the supervisor before any worker starts, and stay open in it: socket *i* of the group is
worker *i*'s, also across a restart of that worker.

Linux only. IPv4 packets with IP options would be steered by their option bytes, not
their port: still always to the same worker, but not the one `worker_for` names; such
packets do not occur between CoAP devices and a gateway in practice.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass

from aiocoap.util import hostportsplit

from gateway.errors import ConfigError

#: Linux's option number, not exposed by Python's socket module.
SO_ATTACH_REUSEPORT_CBPF = 51
#: cBPF loads at this offset reach the network (IP) header instead of the UDP payload.
SKF_NET_OFF = -0x100000

# Classic BPF opcodes (linux/filter.h).
_LD, _LDX, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
_W, _H, _B = 0x00, 0x08, 0x10
_ABS, _IND, _MSH = 0x20, 0x40, 0xA0
_ADD, _RSH, _MOD = 0x00, 0x70, 0x90
_JA, _JEQ = 0x00, 0x10
_K, _X, _A = 0x00, 0x08, 0x10
_TAX = 0x00


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def steering_program(workers: int) -> bytes:
    """The cBPF program (struct sock_filter[]) that returns the worker index of a packet."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    return b"".join(
        [
            _insn(_LD | _B | _ABS, 0, 0, SKF_NET_OFF),  # A = version and header length
            _insn(_ALU | _RSH | _K, 0, 0, 4),  # A = IP version
            _insn(_JMP | _JEQ | _K, 0, 4, 6),  # IPv6: next; IPv4: skip 4
            _insn(_LD | _W | _ABS, 0, 0, SKF_NET_OFF + 20),  # A = source address, low 32 bits
            _insn(_MISC | _TAX, 0, 0, 0),  # X = A
            _insn(_LD | _H | _ABS, 0, 0, SKF_NET_OFF + 40),  # A = UDP source port
            _insn(_JMP | _JA, 0, 0, 4),  # to the sum
            _insn(_LDX | _B | _MSH, 0, 0, SKF_NET_OFF),  # X = IPv4 header length
            _insn(_LD | _H | _IND, 0, 0, SKF_NET_OFF),  # A = UDP source port
            _insn(_MISC | _TAX, 0, 0, 0),  # X = A
            _insn(_LD | _W | _ABS, 0, 0, SKF_NET_OFF + 12),  # A = source address
            _insn(_ALU | _ADD | _X, 0, 0, 0),  # A = A + X (mod 2**32)
            _insn(_ALU | _MOD | _K, 0, 0, workers),  # A = A mod workers
            _insn(_RET | _A, 0, 0, 0),
        ]
    )


def worker_for(host: str, port: int, workers: int) -> int:
    """The worker the steering program sends datagrams from `host`:`port` to."""
    if workers <= 1:
        return 0
    address = ipaddress.ip_address(host.split("%", 1)[0])
    # An IPv4 peer of a dual-stack socket is ::ffff:a.b.c.d: the same low 32 bits.
    low = int.from_bytes(address.packed[-4:], "big")
    return ((low + port) & 0xFFFFFFFF) % workers


def worker_for_address(address: str, workers: int) -> int | None:
    """`worker_for` of a `host:port` / `[v6]:port` address as peers are recorded; None if
    it does not parse (a DTLS or OSCORE peer name, say)."""
    try:
        host, port = hostportsplit(address)
        return worker_for(host, int(port), workers) if port is not None else None
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class WorkerSeat:
    """Which worker this process is, of how many, and the socket it serves on."""

    index: int
    count: int
    sock: socket.socket | None = None

    @property
    def primary(self) -> bool:
        """The worker that also runs what must run once: relay, rules, expiry, pruning."""
        return self.index == 0

    @property
    def shared(self) -> bool:
        return self.count > 1

    def owns(self, address: str | None) -> bool:
        """Whether datagrams from `address` reach this worker (so it may talk to it)."""
        if self.count <= 1:
            return True
        if address is None:
            return False
        owner = worker_for_address(address, self.count)
        return owner == self.index if owner is not None else self.primary


SINGLE = WorkerSeat(0, 1)


def bind_worker_sockets(
    host: str, port: int, workers: int, *, dual_stack: bool
) -> list[socket.socket]:
    """`workers` UDP sockets bound to one port, in order, steered by `steering_program`.

    `dual_stack`: one IPv6 socket that also takes IPv4 (as aiocoap's udp6 transport binds
    the any-address); else a socket of the address's own family.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("server.workers > 1 needs SO_REUSEPORT (Linux)", key="server.workers")
    if dual_stack:
        family = socket.AF_INET6
        address: tuple[str, int] = ("::" if host in ("", "::") else _mapped(host), port)
    else:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family = info[0][0]
        address = info[0][4][:2]  # type: ignore[assignment]
    sockets: list[socket.socket] = []
    try:
        for _ in range(workers):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
            sock.bind(address)
            if address[1] == 0:  # the first bind chose the port; the others share it
                address = (address[0], sock.getsockname()[1])
        attach_steering(sockets[0], workers)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def attach_steering(sock: socket.socket, workers: int) -> None:
    """Attach the program to the port's socket group (any one member will do)."""
    code = steering_program(workers)
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog: unsigned short len; struct sock_filter *filter (copied at attach).
    fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        raise ConfigError(
            f"cannot steer datagrams to workers (SO_ATTACH_REUSEPORT_CBPF): {exc}",
            key="server.workers",
        ) from exc


def _mapped(host: str) -> str:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv4Address):
        return f"::ffff:{address}"
    return host
