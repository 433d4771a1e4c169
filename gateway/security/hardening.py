"""Work-arounds for hostile input that reaches aiocoap before any gateway code runs.

aiocoap 0.4.17 decodes string options (Uri-Path, Uri-Query, ...) with `bytes.decode("utf-8")`
and lets a `UnicodeDecodeError` escape `Message.decode`. The UDP transport only catches
`UnparsableMessage`, so one datagram with a non-UTF-8 Uri-Path made asyncio log an
exception in the transport's read callback (found by tests/fuzz/test_fuzz_coap.py). RFC 7252
§3.2 makes such an option malformed, so the message is unparsable: we turn the error into
`UnparsableMessage`, which the transport already answers by ignoring the datagram (with a
warning line). Installing is idempotent; remove this once aiocoap handles it.

aiocoap's `OscoreSiteWrapper` lets the `DecodeError` of a malformed OSCORE option (reserved
flag bits, a truncated Partial IV) escape from its first look at the request: every such
request was logged as an exception and answered 5.00. RFC 8613 §8.2 asks for 4.02 Bad
Option, which is what the wrapper itself answers when a later step fails to decode.
`CheckedOscoreSiteWrapper` turns that one error into 4.02 (found by the same fuzzer).
"""

from __future__ import annotations

from typing import Any

from aiocoap import CON, error, optiontypes, oscore
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

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


class CheckedOscoreSiteWrapper(OscoreSiteWrapper):  # type: ignore[misc]
    async def render_to_pipe(self, pipe: Any) -> None:
        # The wrapper's first step reads the OSCORE option, before it sends anything or
        # calls the site; it catches its own DecodeErrors after that, so one that gets out
        # is the option's.
        try:
            await super().render_to_pipe(pipe)
        except oscore.DecodeError as exc:
            if pipe.request.mtype == CON:
                raise error.BadOption("Malformed OSCORE option") from exc
            # a NON gets no error answer, as the wrapper does for its own
