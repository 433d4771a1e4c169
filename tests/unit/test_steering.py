"""The steering function that tells a worker which peers are its own (pure parts)."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from gateway.coap.steering import WorkerSeat, steering_program, worker_for, worker_for_address

ports = st.integers(min_value=1, max_value=65535)
workers = st.integers(min_value=1, max_value=64)
ipv4 = st.ip_addresses(v=4).map(str)


@given(ipv4, ports, workers)
def test_an_ipv4_peer_is_steered_alike_on_a_dual_stack_socket(
    host: str, port: int, count: int
) -> None:
    index = worker_for(host, port, count)
    assert 0 <= index < count
    assert worker_for(f"::ffff:{host}", port, count) == index
    assert worker_for_address(f"{host}:{port}", count) == index
    assert worker_for_address(f"[::ffff:{host}]:{port}", count) == index


@given(st.ip_addresses(v=6), ports, workers)
def test_every_ipv6_peer_has_exactly_one_owner(
    address: ipaddress.IPv6Address, port: int, count: int
) -> None:
    peer = f"[{address}]:{port}"
    owners = [index for index in range(count) if WorkerSeat(index, count).owns(peer)]
    assert owners == [worker_for(str(address), port, count)]


def test_consecutive_ports_alternate_between_two_workers() -> None:
    assert [worker_for("127.0.0.1", port, 2) for port in range(40000, 40004)] == [1, 0, 1, 0]


def test_a_single_worker_owns_everything_and_unparsable_peers_go_to_worker_0() -> None:
    assert WorkerSeat(0, 1).owns(None) and WorkerSeat(0, 1).owns("anything")
    assert WorkerSeat(0, 2).owns("oscore-peer") and not WorkerSeat(1, 2).owns("oscore-peer")
    assert not WorkerSeat(0, 2).owns(None)


def test_the_program_is_whole_instructions_ending_in_a_return() -> None:
    program = steering_program(3)
    assert len(program) % 8 == 0
    assert program[-8:-6] == struct.pack("H", 0x16)  # BPF_RET | BPF_A, native order
