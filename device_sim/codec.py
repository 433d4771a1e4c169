"""Reading payloads as devices send them: a CBOR map, or a SenML-CBOR pack (RFC 8428).

Pure functions from values to bytes. A CBOR map carries the measurements by name plus the
reserved keys ``ts`` (device time, epoch seconds) and ``seq`` (the device's counter, which
lets the gateway drop a reading it already stored). A SenML pack uses the integer labels of
RFC 8428 section 6: the first record carries the base name and the base time. SenML has no
field for a counter; a pack with an absolute base time is identified by (name, time), so
nodes send none, but `encode_senml` can add one as a record named ``seq`` on request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import cbor2

from device_sim.models.base import Measurement

CONTENT_FORMAT_CBOR = 60
CONTENT_FORMAT_SENML_CBOR = 112

PayloadFormat = Literal["cbor", "senml"]

# RFC 8428 section 6, table 4
BN, BT, BU, BV = -2, -3, -4, -5
N, U, V, VS, VB, T = 0, 1, 2, 3, 4, 6

RESERVED = frozenset({"ts", "seq"})


def encode_cbor(
    values: Mapping[str, Measurement], *, ts: float | None = None, seq: int | None = None
) -> bytes:
    """A CBOR map of measurement name to value, with ``ts`` and ``seq`` when given."""
    clash = RESERVED.intersection(values)
    if clash:
        raise ValueError(f"measurement names reserved for the envelope: {sorted(clash)}")
    body: dict[str, Any] = dict(values)
    if ts is not None:
        body["ts"] = ts
    if seq is not None:
        body["seq"] = seq
    return bytes(cbor2.dumps(body))


def senml_record(name: str, value: Measurement, unit: str | None = None) -> dict[int, Any]:
    record: dict[int, Any] = {N: name}
    if isinstance(value, bool):
        record[VB] = value
    elif isinstance(value, str):
        record[VS] = value
    else:
        record[V] = value
    if unit is not None:
        record[U] = unit
    return record


def encode_senml(
    values: Mapping[str, Measurement],
    *,
    base_name: str | None = None,
    ts: float | None = None,
    seq: int | None = None,
    units: Mapping[str, str] | None = None,
) -> bytes:
    """A SenML-CBOR pack: one record per measurement, base fields on the first record."""
    if "seq" in values:
        raise ValueError("measurement name 'seq' is reserved for the envelope")
    units = units or {}
    records = [senml_record(name, value, units.get(name)) for name, value in values.items()]
    if seq is not None:
        records.append(senml_record("seq", seq))
    if not records:
        records.append({})
    if base_name is not None:
        records[0] = {BN: base_name, **records[0]}
    if ts is not None:
        records[0] = {BT: ts, **records[0]}
    return bytes(cbor2.dumps(records))


def encode(
    fmt: PayloadFormat,
    values: Mapping[str, Measurement],
    *,
    ts: float | None = None,
    seq: int | None = None,
    base_name: str | None = None,
    units: Mapping[str, str] | None = None,
) -> tuple[bytes, int]:
    """The payload and its CoAP Content-Format number."""
    if fmt == "cbor":
        return encode_cbor(values, ts=ts, seq=seq), CONTENT_FORMAT_CBOR
    if fmt == "senml":
        payload = encode_senml(values, base_name=base_name, ts=ts, seq=seq, units=units)
        return payload, CONTENT_FORMAT_SENML_CBOR
    raise ValueError(f"unknown payload format {fmt!r}")


def decode_senml(payload: bytes) -> tuple[dict[str, Measurement], float | None, int | None]:
    """Resolve a pack this module encoded back to (values by name, base time, seq).

    Names are taken relative to the base name; this is the inverse of `encode_senml` for
    tests and the benchmark responder, not a general SenML resolver.
    """
    records = cbor2.loads(payload)
    if not isinstance(records, list):
        raise ValueError("a SenML pack is an array")
    values: dict[str, Measurement] = {}
    bt: float | None = None
    seq: int | None = None
    for record in records:
        if not isinstance(record, dict):
            raise ValueError("a SenML record is a map")
        if BT in record:
            bt = record[BT]
        if N not in record:
            continue
        value = next(record[k] for k in (V, VS, VB) if k in record)
        if record[N] == "seq":
            seq = value
        else:
            values[record[N]] = value
    return values, bt, seq
