"""The relay envelope and its four wire encodings. Pure: bytes in, bytes out.

One stored reading becomes one `RelayMessage` whose `message_id` ("r-<reading id>") is
stable across retries, so consumers can drop duplicates. docs/relay.md shows the envelope
in every encoding; keep the two in step.

- json / cbor: one map per message (the envelope), a batch is an array of them.
- senml+json / senml+cbor (RFC 8428): one pack per message. The first record carries the
  base name `<device>/`, the base time (device time, when known) and the envelope's
  metadata as extension labels (`id`, `kind`, `device_type`, `gateway`, `received_at`,
  `extra`); they do not end in "_", so plain SenML readers may ignore them (RFC 8428
  section 4.4). A batch is the packs concatenated, itself a valid pack.
"""

from __future__ import annotations

import enum
import json
import math
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cbor2

from gateway.errors import GatewayError

ENVELOPE_VERSION = 1

KINDS: frozenset[str] = frozenset({"reading", "alert", "event", "command_result"})

Scalar = float | int | bool | str


class EnvelopeError(GatewayError):
    """A message cannot be encoded (for example a NaN value) or a body cannot be decoded."""


class Encoding(enum.StrEnum):
    JSON = "json"
    CBOR = "cbor"
    SENML_JSON = "senml+json"
    SENML_CBOR = "senml+cbor"

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES[self]

    @property
    def content_format(self) -> int:
        """The CoAP Content-Format number (RFC 7252 registry)."""
        return _CONTENT_FORMATS[self]


_CONTENT_TYPES = {
    Encoding.JSON: "application/json",
    Encoding.CBOR: "application/cbor",
    Encoding.SENML_JSON: "application/senml+json",
    Encoding.SENML_CBOR: "application/senml+cbor",
}
_CONTENT_FORMATS = {
    Encoding.JSON: 50,
    Encoding.CBOR: 60,
    Encoding.SENML_JSON: 110,
    Encoding.SENML_CBOR: 112,
}


class Value(NamedTuple):
    name: str
    value: Scalar
    unit: str | None = None


@dataclass(frozen=True)
class RelayMessage:
    message_id: str
    kind: str
    device: str
    device_type: str
    gateway: str
    device_time: float | None
    received_at: float
    values: Sequence[Value] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EnvelopeError(f"unknown message kind {self.kind!r}")
        # Lists are accepted for convenience; stored as a tuple so messages stay comparable.
        object.__setattr__(self, "values", tuple(self.values))


def reading_message(
    *,
    reading_id: int,
    device: str,
    device_type: str,
    gateway: str,
    name: str,
    value: Scalar,
    unit: str | None,
    device_time: float | None,
    received_at: float,
    seq: int | None = None,
) -> RelayMessage:
    """The message for one stored reading row (one measurement)."""
    return RelayMessage(
        message_id=f"r-{reading_id}",
        kind="reading",
        device=device,
        device_type=device_type,
        gateway=gateway,
        device_time=device_time,
        received_at=received_at,
        values=(Value(name, value, unit),),
        extra={} if seq is None else {"seq": seq},
    )


# ---------------------------------------------------------------- envelope (json, cbor)


def to_envelope(message: RelayMessage) -> dict[str, Any]:
    return {
        "v": ENVELOPE_VERSION,
        "id": message.message_id,
        "kind": message.kind,
        "gateway": message.gateway,
        "device": message.device,
        "device_type": message.device_type,
        "device_time": message.device_time,
        "received_at": message.received_at,
        "values": [{"name": v.name, "value": v.value, "unit": v.unit} for v in message.values],
        "extra": dict(message.extra),
    }


def from_envelope(data: Any) -> RelayMessage:
    if not isinstance(data, Mapping):
        raise EnvelopeError("envelope is not a map")
    try:
        values = [Value(v["name"], v["value"], v.get("unit")) for v in data["values"]]
        return RelayMessage(
            message_id=data["id"],
            kind=data["kind"],
            device=data["device"],
            device_type=data["device_type"],
            gateway=data["gateway"],
            device_time=data.get("device_time"),
            received_at=data["received_at"],
            values=values,
            extra=data.get("extra") or {},
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise EnvelopeError(f"malformed envelope: {exc!r}") from exc


# ---------------------------------------------------------------- SenML (RFC 8428)

# Registered labels; SenML-CBOR uses the integer, SenML-JSON the text (RFC 8428 table 4).
_BN, _BT, _N, _U, _V, _VS, _VB = "bn", "bt", "n", "u", "v", "vs", "vb"
_CBOR_LABELS = {_BN: -2, _BT: -3, _N: 0, _U: 1, _V: 2, _VS: 3, _VB: 4}
_TEXT_LABELS: dict[Any, str] = {number: text for text, number in _CBOR_LABELS.items()}


def _value_fields(value: Scalar) -> dict[str, Any]:
    if isinstance(value, bool):
        return {_VB: value}
    if isinstance(value, str):
        return {_VS: value}
    return {_V: value}


def to_senml(message: RelayMessage) -> list[dict[str, Any]]:
    base: dict[str, Any] = {_BN: f"{message.device}/"}
    if message.device_time is not None:
        base[_BT] = message.device_time
    base.update(
        id=message.message_id,
        kind=message.kind,
        device_type=message.device_type,
        gateway=message.gateway,
        received_at=message.received_at,
    )
    if message.extra:
        base["extra"] = dict(message.extra)
    records: list[dict[str, Any]] = []
    for index, value in enumerate(message.values):
        record = base if index == 0 else {}
        record[_N] = value.name
        if value.unit is not None:
            record[_U] = value.unit
        record.update(_value_fields(value.value))
        records.append(record)
    # A message without values is one record of base fields and metadata alone.
    return records or [base]


def _records_to_message(records: Sequence[Mapping[str, Any]]) -> RelayMessage:
    first = records[0]
    prefix = first.get(_BN, "")
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise EnvelopeError("SenML pack without the gateway's base name")
    values: list[Value] = []
    for record in records:
        if _N not in record:
            continue
        for label in (_V, _VS, _VB):
            if label in record:
                values.append(Value(record[_N], record[label], record.get(_U)))
                break
        else:
            raise EnvelopeError(f"SenML record {record[_N]!r} has no value")
    try:
        return RelayMessage(
            message_id=first["id"],
            kind=first["kind"],
            device=prefix[:-1],
            device_type=first["device_type"],
            gateway=first["gateway"],
            device_time=first.get(_BT),
            received_at=first["received_at"],
            values=values,
            extra=first.get("extra") or {},
        )
    except KeyError as exc:
        raise EnvelopeError(f"SenML pack lacks the {exc.args[0]!r} label") from exc


def from_senml_batch(records: Any) -> list[RelayMessage]:
    if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
        raise EnvelopeError("SenML pack is not an array of records")
    messages: list[list[Mapping[str, Any]]] = []
    for record in records:
        if "id" in record:
            messages.append([record])
        elif messages:
            messages[-1].append(record)
        else:
            raise EnvelopeError("SenML pack does not start with a message's first record")
    return [_records_to_message(group) for group in messages]


def _cbor_labels(record: Mapping[str, Any]) -> dict[Any, Any]:
    return {_CBOR_LABELS.get(k, k): v for k, v in record.items()}


def _text_labels(record: Any) -> dict[Any, Any]:
    if not isinstance(record, Mapping):
        raise EnvelopeError("SenML record is not a map")
    return {_TEXT_LABELS.get(k, k): v for k, v in record.items()}


# ---------------------------------------------------------------- bytes


def _check_finite(message: RelayMessage) -> None:
    for value in message.values:
        if isinstance(value.value, float) and not math.isfinite(value.value):
            raise EnvelopeError(f"{message.message_id}: {value.name} is not a finite number")


def _json(obj: Any) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(f"cannot encode as JSON: {exc}") from exc


def _cbor(obj: Any) -> bytes:
    try:
        data: bytes = cbor2.dumps(obj)
    except (TypeError, ValueError, cbor2.CBOREncodeError) as exc:
        raise EnvelopeError(f"cannot encode as CBOR: {exc}") from exc
    return data


def encode_batch(messages: Iterable[RelayMessage], encoding: Encoding) -> bytes:
    """Several messages in one body: an array of envelopes, or one concatenated pack."""
    messages = list(messages)
    for message in messages:
        _check_finite(message)
    if encoding is Encoding.JSON:
        return _json([to_envelope(m) for m in messages])
    if encoding is Encoding.CBOR:
        return _cbor([to_envelope(m) for m in messages])
    records = [r for m in messages for r in to_senml(m)]
    if encoding is Encoding.SENML_JSON:
        return _json(records)
    return _cbor([_cbor_labels(r) for r in records])


def encode(message: RelayMessage, encoding: Encoding) -> bytes:
    """One message: the envelope map, or its SenML pack."""
    _check_finite(message)
    if encoding is Encoding.JSON:
        return _json(to_envelope(message))
    if encoding is Encoding.CBOR:
        return _cbor(to_envelope(message))
    return encode_batch([message], encoding)


def _load(body: bytes, encoding: Encoding) -> Any:
    try:
        if encoding in (Encoding.JSON, Encoding.SENML_JSON):
            return json.loads(body)
        return cbor2.loads(body)
    except (ValueError, cbor2.CBORDecodeError) as exc:
        raise EnvelopeError(f"body is not {encoding}: {exc}") from exc


def decode_batch(body: bytes, encoding: Encoding) -> list[RelayMessage]:
    data = _load(body, encoding)
    if encoding in (Encoding.JSON, Encoding.CBOR):
        if isinstance(data, Mapping):
            return [from_envelope(data)]
        if not isinstance(data, list):
            raise EnvelopeError("body is neither an envelope nor an array of them")
        return [from_envelope(item) for item in data]
    if encoding is Encoding.SENML_CBOR:
        if not isinstance(data, list):
            raise EnvelopeError("SenML pack is not an array of records")
        data = [_text_labels(r) for r in data]
    return from_senml_batch(data)


def decode(body: bytes, encoding: Encoding) -> RelayMessage:
    """The inverse of `encode`; consumers and tests use it."""
    messages = decode_batch(body, encoding)
    if len(messages) != 1:
        raise EnvelopeError(f"expected one message, found {len(messages)}")
    return messages[0]


# ---------------------------------------------------------------- topics and subjects

TEMPLATE_FIELDS: frozenset[str] = frozenset({"gateway", "type", "device", "kind", "id"})


def check_template(template: str) -> None:
    """Raise ValueError naming a placeholder a topic template may not use."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"malformed template {template!r}: {exc}") from exc
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            allowed = ", ".join(sorted(f"{{{f}}}" for f in TEMPLATE_FIELDS))
            raise ValueError(f"template {template!r}: unknown placeholder {{{name}}} ({allowed})")


def render_template(template: str, message: RelayMessage, safe: Callable[[str], str]) -> str:
    """Fill a topic or subject template; `safe` neutralises separators in the values."""
    return template.format_map(
        {
            "gateway": safe(message.gateway),
            "type": safe(message.device_type),
            "device": safe(message.device),
            "kind": safe(message.kind),
            "id": safe(message.message_id),
        }
    )


class AddressTemplate:
    """A topic or subject template and its `safe` rule. Unless it names `{id}`, a
    device's address is the same for all its messages of a kind, so it is rendered once
    per device and kind rather than once per message."""

    #: Addresses kept; past this many (devices x kinds) the cache starts afresh.
    MAX_CACHED = 10_000

    def __init__(self, template: str, safe: Callable[[str], str]) -> None:
        self.template = template
        self._safe = safe
        self._per_message = any(
            name == "id" for _, name, _, _ in string.Formatter().parse(template)
        )
        self._rendered: dict[tuple[str, str, str, str], str] = {}

    def render(self, message: RelayMessage) -> str:
        if self._per_message:
            return render_template(self.template, message, self._safe)
        key = (message.gateway, message.device_type, message.device, message.kind)
        address = self._rendered.get(key)
        if address is None:
            if len(self._rendered) >= self.MAX_CACHED:
                self._rendered.clear()
            address = render_template(self.template, message, self._safe)
            self._rendered[key] = address
        return address


def _replacer(bad: str) -> Callable[[str], str]:
    table = str.maketrans(dict.fromkeys(bad, "_"))

    def safe(value: str) -> str:
        return value.translate(table) or "_"

    return safe


#: A device name must not add MQTT topic levels or wildcards.
mqtt_safe = _replacer("/+#\0")
#: A device name must not add NATS subject tokens or wildcards.
nats_safe = _replacer(".*> \t\r\n")
