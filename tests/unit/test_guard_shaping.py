"""Amplification arithmetic of the guard (RFC 7252 §11.3, RFC 7959 block sizes)."""

from __future__ import annotations

import aiocoap
from aiocoap.numbers.codes import Code
from hypothesis import given
from hypothesis import strategies as st

from gateway.security.guard import RESPONSE_OVERHEAD, block_exponent_for, message_size


def test_message_size_matches_the_wire() -> None:
    message = aiocoap.Message(code=Code.GET, uri_path=("r", "fr1"), payload=b"abc")
    message.mtype, message.mid, message.token = aiocoap.CON, 1, b"\x01\x02"
    assert message_size(message) == len(message.encode())


def test_block_sizes() -> None:
    assert block_exponent_for(10, 0) is None
    assert block_exponent_for(RESPONSE_OVERHEAD + 16, 0) == 0
    assert block_exponent_for(RESPONSE_OVERHEAD + 8 + 100, 8) == 2  # 64-byte blocks
    assert block_exponent_for(5000, 8) == 6


@given(budget=st.integers(0, 5000), token=st.integers(0, 8))
def test_chosen_blocks_fit_the_budget(budget: int, token: int) -> None:
    exponent = block_exponent_for(budget, token)
    if exponent is not None:
        assert RESPONSE_OVERHEAD + token + 2 ** (exponent + 4) <= budget
        assert exponent == 6 or RESPONSE_OVERHEAD + token + 2 ** (exponent + 5) > budget
