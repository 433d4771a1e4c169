"""A hostile peer in its own process: raw CON POSTs at a fixed rate, tallying the answers.

Run as `python -m tests.support.flooder PORT RATE`. It prints `started` once 100 requests
are out, and on SIGTERM prints its tally as one JSON line and exits. Being a process of its
own, it shares no interpreter lock with the fleet that measures the gateway beside it.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from types import FrameType

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type


def flood(port: int, rate: float) -> dict[str, int]:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    payload = cbor2.dumps({"temp": 1.0})
    interval = 1.0 / rate
    answers: dict[str, int] = {"sent": 0}
    mid = 0
    next_send = time.monotonic()
    while not stopping:
        now = time.monotonic()
        if now >= next_send:
            mid = (mid + 1) & 0xFFFF
            message = aiocoap.Message(
                code=Code.POST, uri_path=("r", "flooder"), payload=payload, content_format=60
            )
            message.mid = mid
            message.mtype = Type.CON
            message.token = mid.to_bytes(2, "big")
            sock.send(message.encode())
            answers["sent"] += 1
            if answers["sent"] == 100:
                print("started", flush=True)
            next_send += interval
            continue
        # Blocks in recv between sends: the flooder does not spin a core of its own.
        sock.settimeout(max(next_send - now, 0.0005))
        try:
            data = sock.recv(2048)
        except (TimeoutError, BlockingIOError, InterruptedError):
            continue
        code = str(aiocoap.Message.decode(data).code)
        answers[code] = answers.get(code, 0) + 1
    sock.close()
    return answers


if __name__ == "__main__":
    tally = flood(int(sys.argv[1]), float(sys.argv[2]))
    print(json.dumps(tally), flush=True)
