"""The simulator's payload encoders round-trip through cbor2 for any values the contract allows."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_sim.codec import (
    BN,
    BT,
    CONTENT_FORMAT_CBOR,
    CONTENT_FORMAT_SENML_CBOR,
    VB,
    VS,
    N,
    U,
    V,
    decode_senml,
    encode,
    encode_cbor,
    encode_senml,
)

names = st.text(min_size=1, max_size=20).filter(lambda s: s not in ("ts", "seq"))
values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
readings = st.dictionaries(names, values, max_size=12)
times = st.one_of(st.none(), st.floats(min_value=0, max_value=4e9))
seqs = st.one_of(st.none(), st.integers(min_value=0, max_value=2**32))


@given(readings, times, seqs)
def test_cbor_map_round_trips(values_: dict, ts: float | None, seq: int | None) -> None:  # type: ignore[type-arg]
    decoded = cbor2.loads(encode_cbor(values_, ts=ts, seq=seq))
    assert decoded.pop("ts", None) == ts
    assert decoded.pop("seq", None) == seq
    assert decoded == values_
    for k, v in values_.items():
        assert type(decoded[k]) is type(v)


@given(readings, times, seqs, st.one_of(st.none(), st.text(max_size=20)))
def test_senml_pack_round_trips(
    values_: dict,  # type: ignore[type-arg]
    ts: float | None,
    seq: int | None,
    bn: str | None,
) -> None:
    payload = encode_senml(values_, base_name=bn, ts=ts, seq=seq)
    records = cbor2.loads(payload)
    assert isinstance(records, list) and records
    assert records[0].get(BN) == bn and records[0].get(BT) == ts
    assert all(set(r) <= {BN, BT, N, U, V, VS, VB} for r in records)
    got, bt, got_seq = decode_senml(payload)
    assert got == values_ and bt == ts and got_seq == seq
    for k, v in values_.items():
        assert type(got[k]) is type(v)


def test_senml_uses_the_typed_value_labels_and_units() -> None:
    payload = encode_senml(
        {"temp": 4.5, "door": False, "mode": "eco", "stock_milk": 3},
        base_name="fridge-1/",
        ts=1.7e9,
        seq=7,
        units={"temp": "Cel"},
    )
    assert cbor2.loads(payload) == [
        {BT: 1.7e9, BN: "fridge-1/", N: "temp", V: 4.5, U: "Cel"},
        {N: "door", VB: False},
        {N: "mode", VS: "eco"},
        {N: "stock_milk", V: 3},
        {N: "seq", V: 7},
    ]


def test_reserved_names_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_cbor({"seq": 1})
    with pytest.raises(ValueError):
        encode_senml({"seq": 1})


def test_encode_names_the_content_format() -> None:
    assert encode("cbor", {"a": 1})[1] == CONTENT_FORMAT_CBOR
    assert encode("senml", {"a": 1})[1] == CONTENT_FORMAT_SENML_CBOR
    with pytest.raises(ValueError):
        encode("json", {"a": 1})  # type: ignore[arg-type]
