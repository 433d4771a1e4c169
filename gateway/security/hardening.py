"""Work-arounds for hostile input that reaches aiocoap before any gateway code runs.

aiocoap 0.4.17 decodes string options (Uri-Path, Uri-Query, ...) with `bytes.decode("utf-8")`
and lets a `UnicodeDecodeError` escape `Message.decode`. The UDP transport only catches
`UnparsableMessage`, so one datagram with a non-UTF-8 Uri-Path made asyncio log an
exception in the transport's read callback (found by tests/fuzz/test_fuzz_coap.py). RFC 7252
§3.2 makes such an option malformed, so the message is unparsable: we turn the error into
`UnparsableMessage`, which the transport already answers by ignoring the datagram (with a
warning line). Installing is idempotent; remove this once aiocoap handles it.
"""

from __future__ import annotations

from typing import Any

from aiocoap import error, optiontypes

_MARK = "_gateway_utf8_fix"


def install_option_decoding_fix() -> None:
    original = optiontypes.StringOption.decode
    if getattr(original, _MARK, False):
        return

    def decode(self: Any, rawdata: bytes) -> None:
        try:
            original(self, rawdata)
        except UnicodeDecodeError as exc:
            raise error.UnparsableMessage("string option is not valid UTF-8") from exc

    setattr(decode, _MARK, True)
    optiontypes.StringOption.decode = decode
