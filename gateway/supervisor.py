"""`gateway serve --workers N`: N worker processes serving one port, kept running.

One Python process serves about one core. The supervisor brings the database schema up to
date once, binds the N sockets of the port in order with the program that steers each peer
to one of them (gateway/coap/steering.py), and starts worker *i* as `gateway serve` with
socket *i* inherited. It stays small and does no CoAP itself: it forwards SIGINT and
SIGTERM to the workers, waits for them to finish their commits, and exits 0 when all of
them stopped cleanly (1 otherwise). A worker that exits on its own is logged and started
again after a pause that grows while it keeps failing; its socket stays open here all the
while, so its peers' datagrams wait in the socket's buffer and go to the same worker as
before. A worker that exits with an error within seconds of its first start (say the
database cannot be opened) stops the whole gateway: restarting would not help.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence

import structlog

from gateway.coap.server import choose_transport
from gateway.coap.steering import bind_worker_sockets
from gateway.config import GatewayConfig
from gateway.store.db import migrate, open_database

log = structlog.get_logger(__name__)

#: Seconds a stopping worker gets to finish its commits before it is killed.
STOP_DEADLINE = 30.0
#: A worker that exits with an error this soon after its first start stops the gateway.
EARLY_FAILURE = 5.0
#: Pause before a restart, doubled per failure in a row up to `RESTART_MAX`.
RESTART_PAUSE = 0.5
RESTART_MAX = 30.0

WorkerCommand = Callable[[int, int, int], Sequence[str]]


def worker_command(serve_args: Sequence[str]) -> WorkerCommand:
    """How to start worker `index` of `count` on socket `fd`: this same `gateway serve`."""

    def command(index: int, count: int, fd: int) -> Sequence[str]:
        seat = f"{index}:{count}:{fd}:{os.getpid()}"
        return [sys.executable, "-m", "gateway", "serve", *serve_args, "--worker-seat", seat]

    return command


class Supervisor:
    def __init__(self, config: GatewayConfig, command: WorkerCommand) -> None:
        self._config = config
        self._command = command
        self._count = config.server.workers
        self._stopping = asyncio.Event()
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._failed = False

    def stop(self) -> None:
        if not self._stopping.is_set():
            log.info("workers.stopping", workers=len(self._processes))
        self._stopping.set()
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)

    async def run(self) -> int:
        config = self._config
        db = await open_database(config.store.path, synchronous=config.store.synchronous)
        try:
            await migrate(db)
        finally:
            await db.close()
        transport = choose_transport(config.server.bind, config.server.transport)
        sockets = bind_worker_sockets(
            config.server.bind,
            config.server.port,
            self._count,
            dual_stack=transport == "udp6",
        )
        try:
            port = sockets[0].getsockname()[1]
            log.info("workers.starting", workers=self._count, bind=config.server.bind, port=port)
            async with asyncio.TaskGroup() as tasks:
                for index, sock in enumerate(sockets):
                    tasks.create_task(self._keep_running(index, sock), name=f"worker[{index}]")
        finally:
            for sock in sockets:
                sock.close()
        log.info("workers.stopped", failed=self._failed)
        return 1 if self._failed else 0

    async def _keep_running(self, index: int, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        first = True
        while not self._stopping.is_set():
            fd = sock.fileno()
            process = await asyncio.create_subprocess_exec(
                *self._command(index, self._count, fd), pass_fds=(fd,)
            )
            self._processes[index] = process
            started = loop.time()
            log.info("worker.started", worker=index, pid=process.pid)
            if self._stopping.is_set():  # a stop that came while it was being started
                process.send_signal(signal.SIGTERM)
            code = await self._wait(process)
            if self._stopping.is_set():
                if code != 0:
                    self._failed = True
                log.info("worker.stopped", worker=index, pid=process.pid, code=code)
                return
            lived = loop.time() - started
            log.error("worker.exited", worker=index, pid=process.pid, code=code, seconds=lived)
            if first and lived < EARLY_FAILURE and code > 0:
                self._failed = True
                log.error("workers.giving_up", worker=index, reason="failed at start")
                self.stop()
                return
            first = False
            failures = failures + 1 if lived < RESTART_MAX else 1
            pause = min(RESTART_MAX, RESTART_PAUSE * 2 ** (failures - 1))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._stopping.wait()

    async def _wait(self, process: asyncio.subprocess.Process) -> int:
        """The worker's exit status; killed if a stop does not end it within the deadline."""
        waiting = asyncio.ensure_future(process.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not waiting.done():
            try:
                async with asyncio.timeout(STOP_DEADLINE):
                    await asyncio.shield(waiting)
            except TimeoutError:
                log.error("worker.killed", pid=process.pid, reason="stop deadline passed")
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        return await waiting


#: prctl(2) option: the signal this process gets when its parent dies (Linux).
PR_SET_PDEATHSIG = 1


def follow_supervisor(supervisor_pid: int) -> None:
    """In a worker: be stopped (SIGTERM) when the supervisor dies, even killed outright.

    Orphaned workers would keep serving the port beside the workers of a new supervisor,
    whose steering program counts only its own sockets.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


async def supervise(config: GatewayConfig, command: WorkerCommand) -> int:
    """Run the workers until SIGINT or SIGTERM; the exit status."""
    supervisor = Supervisor(config, command)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, supervisor.stop)
    try:
        return await supervisor.run()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
