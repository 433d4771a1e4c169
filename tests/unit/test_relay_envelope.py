"""The relay envelope: every encoding round-trips, and SenML stays SenML."""

from __future__ import annotations

import contextlib
import json
import math

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.relay.envelope import (
    KINDS,
    AddressTemplate,
    Encoding,
    EnvelopeError,
    RelayMessage,
    Value,
    check_template,
    decode,
    decode_batch,
    encode,
    encode_batch,
    mqtt_safe,
    nats_safe,
    reading_message,
    render_template,
)

names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
values = st.builds(Value, names, scalars, st.none() | st.sampled_from(["Cel", "%", "W", "lx"]))
times = st.floats(0, 4e9, allow_nan=False)
messages = st.builds(
    RelayMessage,
    message_id=st.from_regex(r"r-[0-9]{1,12}", fullmatch=True),
    kind=st.sampled_from(sorted(KINDS)),
    device=names,
    device_type=st.sampled_from(["fridge", "tracker", "streetlight", "generic"]),
    gateway=names,
    device_time=st.none() | times,
    received_at=times,
    values=st.lists(values, max_size=4),
    extra=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3),
)


@given(messages, st.sampled_from(list(Encoding)))
def test_every_encoding_round_trips(message: RelayMessage, encoding: Encoding) -> None:
    assert decode(encode(message, encoding), encoding) == message


@given(st.lists(messages, max_size=5), st.sampled_from(list(Encoding)))
def test_batches_round_trip(batch: list[RelayMessage], encoding: Encoding) -> None:
    assert decode_batch(encode_batch(batch, encoding), encoding) == batch


@given(st.binary(max_size=64), st.sampled_from(list(Encoding)))
def test_garbage_gives_a_clean_error(body: bytes, encoding: Encoding) -> None:
    with contextlib.suppress(EnvelopeError):
        decode_batch(body, encoding)


def fridge() -> RelayMessage:
    return reading_message(
        reading_id=42,
        device="fridge-1",
        device_type="fridge",
        gateway="gw1",
        name="temp",
        value=4.5,
        unit="Cel",
        device_time=1700000000.0,
        received_at=1700000000.25,
        seq=7,
    )


def test_json_envelope_shape() -> None:
    body = json.loads(encode(fridge(), Encoding.JSON))
    assert body == {
        "v": 1,
        "id": "r-42",
        "kind": "reading",
        "gateway": "gw1",
        "device": "fridge-1",
        "device_type": "fridge",
        "device_time": 1700000000.0,
        "received_at": 1700000000.25,
        "values": [{"name": "temp", "value": 4.5, "unit": "Cel"}],
        "extra": {"seq": 7},
    }


def test_senml_cbor_uses_registered_integer_labels() -> None:
    message = RelayMessage(
        "r-1", "reading", "fridge-1", "fridge", "gw1", None, 5.0,
        [Value("temp", 4.5, "Cel"), Value("door", True), Value("state", "ok")],
    )  # fmt: skip
    records = cbor2.loads(encode(message, Encoding.SENML_CBOR))
    assert records[0][-2] == "fridge-1/" and -3 not in records[0]  # no device time: no bt
    assert (records[0][0], records[0][1], records[0][2]) == ("temp", "Cel", 4.5)
    assert records[1] == {0: "door", 4: True}
    assert records[2] == {0: "state", 3: "ok"}
    assert records[0]["id"] == "r-1"


def test_senml_json_resolves_to_device_and_measurement() -> None:
    records = json.loads(encode(fridge(), Encoding.SENML_JSON))
    assert records[0]["bn"] + records[0]["n"] == "fridge-1/temp"
    assert records[0]["bt"] == 1700000000.0 and records[0]["v"] == 4.5


def test_content_types() -> None:
    assert Encoding.SENML_CBOR.content_type == "application/senml+cbor"
    assert [e.content_format for e in Encoding] == [50, 60, 110, 112]


def test_non_finite_values_are_refused() -> None:
    message = RelayMessage("r-1", "reading", "d", "t", "g", None, 0.0, [Value("x", math.nan)])
    for encoding in Encoding:
        with pytest.raises(EnvelopeError):
            encode(message, encoding)


def test_unknown_kind() -> None:
    with pytest.raises(EnvelopeError):
        RelayMessage("x", "gossip", "d", "t", "g", None, 0.0)


def test_templates() -> None:
    message = reading_message(
        reading_id=1, device="a/b+#", device_type="fridge", gateway="gw1", name="t", value=1,
        unit=None, device_time=None, received_at=0,
    )  # fmt: skip
    topic = render_template("coap-gw/{gateway}/{type}/{device}/readings", message, mqtt_safe)
    assert topic == "coap-gw/gw1/fridge/a_b__/readings"
    dotted = RelayMessage("r-1", "reading", "x.y *", "fridge", "g", None, 0.0)
    assert render_template("coapgw.{type}.{device}.{id}", dotted, nats_safe) == (
        "coapgw.fridge.x_y__.r-1"
    )
    check_template("coapgw.{type}.{device}.readings")
    for bad in ("{nope}", "{device!r}", "{device:>5}", "{"):
        with pytest.raises(ValueError):
            check_template(bad)


def test_an_address_template_renders_as_the_template_does() -> None:
    messages = [
        RelayMessage(f"r-{i}", kind, device, "fridge", "g", None, 0.0)
        for i, (kind, device) in enumerate(
            [("reading", "x.y"), ("reading", "x.y"), ("alert", "x.y"), ("reading", "z")]
        )
    ]
    for template in ("coapgw.{type}.{device}.{kind}", "coapgw.{device}.{id}"):
        addresses = AddressTemplate(template, nats_safe)
        for message in messages:
            assert addresses.render(message) == render_template(template, message, nats_safe)
