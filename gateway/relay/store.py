"""The relay's SQL: routes, the outbox, dead letters and the status table.

Functions taking a connection run inside the caller's transaction (the store writer's, or
the CLI's own); the writer-side ones change state only along `gateway.core.outbox`'s table.
Those of the worker's round take a blocking `sqlite3.Connection`, the others aiosqlite's.
Nothing here reads the clock: `now` comes in.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiosqlite

from gateway.core.model import value_from_row
from gateway.core.outbox import BatchPlan, BatchPlanner, DeliveryState, OutboxRow, Settlement
from gateway.relay.config import RouteConfig
from gateway.relay.envelope import Encoding, RelayMessage, reading_message
from gateway.store.queries import READING_SELECT

#: SQLite's limit on bound parameters is far higher; this keeps statements small.
CHUNK = 500


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]


def _marks(count: int) -> str:
    return ",".join("?" * count)


# ---------------------------------------------------------------- start-up


async def sync_routes(conn: aiosqlite.Connection, routes: Sequence[RouteConfig]) -> None:
    """Replace the routes table with the configured routes (one row per glob combination)."""
    await conn.execute("DELETE FROM routes")
    rows = {
        (index, route.sink, kind, device_type, device, route.encoding)
        for index, route in enumerate(routes)
        for kind in route.kinds
        for device_type in route.device_types
        for device in route.devices
    }
    await conn.executemany(
        "INSERT INTO routes (route, sink, kind, device_type, device, encoding)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        sorted(rows),
    )


async def release_all(conn: aiosqlite.Connection) -> int:
    """After a crash: entries claimed but never settled go back to pending."""
    cursor = await conn.execute(
        "UPDATE outbox SET state = 'pending' WHERE state = 'in_flight'",
    )
    return cursor.rowcount


async def depths(conn: aiosqlite.Connection) -> dict[str, int]:
    async with conn.execute("SELECT sink, count(*) FROM outbox GROUP BY sink") as cursor:
        return {row[0]: int(row[1]) for row in await cursor.fetchall()}


# ---------------------------------------------------------------- the worker's round
#
# Blocking sqlite3 code: the worker runs a whole round (settle the last batch, plan and claim
# the next) as one `StoreWriter.run_in_transaction` call, a single trip to the database
# thread.


class Entry(NamedTuple):
    """A claimed outbox entry."""

    id: int
    sink: str
    kind: str
    ref_id: int
    device_id: int
    encoding: Encoding
    attempt: int
    first_at: float


#: A window's rows carry what a claimed `Entry` needs, then what the planner needs: the
#: claim then only marks them, with no second read.
WINDOW_COLUMNS = (
    "id, sink, kind, ref_id, device_id, encoding, attempt, first_at, state, next_attempt_at"
)
SELECT_WINDOW = f"SELECT {WINDOW_COLUMNS} FROM outbox WHERE sink = ? ORDER BY id LIMIT ?"
SELECT_AFTER = (
    f"SELECT {WINDOW_COLUMNS} FROM outbox WHERE sink = ? AND id > ?{{}} ORDER BY id LIMIT ?"
)
#: Further windows a round reads past devices that wait, and how many such devices it
#: leaves out by name (one bound parameter each: within the 999 of SQLite before 3.32);
#: beyond either, the round plans with what it has.
MAX_WINDOWS_PAST_BLOCKED = 4
MAX_BLOCKED_LEFT_OUT = 900
# Enum lookups by value without `EnumType.__call__`, once per row read.
_STATES = {state.value: state for state in DeliveryState}
_ENCODINGS = {encoding.value: encoding for encoding in Encoding}


def plan_window(
    conn: sqlite3.Connection, sink: str, *, now: float, limit: int, window: int
) -> tuple[BatchPlan, dict[int, Any]]:
    """Plan the sink's next batch from its oldest `window` unfinished entries, reading
    them in id order only as far as the plan needs (see `BatchPlanner`); the plan, and the
    rows read by id (what `claim_next` makes its entries of).

    A window taken up by devices that wait (in flight, or for a retry) would hold back
    every device after it, so while the batch has room the round reads on past it,
    leaving those devices out of the query: each later row of theirs would be skipped
    anyway, and a device first met there is still read in id order.
    """
    planner = BatchPlanner(now=now, limit=limit)
    rows: dict[int, Any] = {}
    query = SELECT_WINDOW
    params: tuple[Any, ...] = (sink, window)
    for _ in range(1 + MAX_WINDOWS_PAST_BLOCKED):
        read, last_id = 0, 0
        cursor = conn.execute(query, params)
        try:
            for row in cursor:
                read, last_id = read + 1, row[0]
                rows[last_id] = row
                # The planner keys order by device; the device id is as good as its name.
                offered = OutboxRow(last_id, str(row[4]), _STATES[row[8]], row[9])
                if not planner.offer(offered):
                    return planner.plan(), rows
        finally:
            cursor.close()
        blocked = planner.blocked
        if read < window or len(blocked) > MAX_BLOCKED_LEFT_OUT:
            break
        leave_out = f" AND device_id NOT IN ({_marks(len(blocked))})" if blocked else ""
        query = SELECT_AFTER.format(leave_out)
        params = (sink, last_id, *(int(device) for device in blocked), window)
    return planner.plan(), rows


def _entry(row: Any) -> Entry:
    return Entry(row[0], row[1], row[2], row[3], row[4], _ENCODINGS[row[5]], row[6], row[7])


def mark_in_flight(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    """pending -> in_flight, in the transaction that planned them (so they are pending)."""
    for part in _chunks(ids):
        conn.execute(
            f"UPDATE outbox SET state = 'in_flight' WHERE id IN ({_marks(len(part))})",
            part,
        )


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one round claimed: the entries in id order and their messages by entry id
    (missing where the source row is gone); when nothing was due, `wake_at` is the earliest
    retry (None: nothing waits)."""

    entries: list[Entry]
    messages: dict[int, RelayMessage]
    wake_at: float | None


def claim_next(
    conn: sqlite3.Connection, sink: str, *, now: float, limit: int, window: int, gateway: str
) -> Claimed:
    """Plan the sink's next batch and claim it, with the messages to send."""
    plan, rows = plan_window(conn, sink, now=now, limit=limit, window=window)
    ids = [row.id for row in plan.send]
    mark_in_flight(conn, ids)
    entries = [_entry(rows[entry_id]) for entry_id in ids]
    return Claimed(entries, load_messages(conn, entries, gateway=gateway), plan.wake_at)


def release(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    """in_flight -> pending without counting an attempt (cancelled, not failed)."""
    for part in _chunks(ids):
        conn.execute(
            f"UPDATE outbox SET state = 'pending' WHERE id IN ({_marks(len(part))})"
            " AND state = 'in_flight'",
            part,
        )


def load_messages(
    conn: sqlite3.Connection, entries: Sequence[Entry], *, gateway: str
) -> dict[int, RelayMessage]:
    """The message of each entry, by entry id; entries whose source is gone are missing."""
    messages: dict[int, RelayMessage] = {}
    readings = [e for e in entries if e.kind == "reading"]
    events = [e for e in entries if e.kind != "reading"]
    found: dict[int, RelayMessage] = {}
    for part in _chunks([e.ref_id for e in readings]):
        for row in conn.execute(
            f"{READING_SELECT} WHERE r.id IN ({_marks(len(part))})", part
        ).fetchall():
            found[row[0]] = reading_message(
                reading_id=row[0],
                device=row[1],
                device_type=row[2],
                gateway=gateway,
                name=row[3],
                value=value_from_row(row[4], row[5]),
                unit=row[6],
                device_time=row[7],
                received_at=row[8],
                seq=row[9],
            )
    for entry in readings:
        if entry.ref_id in found:
            messages[entry.id] = found[entry.ref_id]
    found = {}
    for part in _chunks([e.ref_id for e in events]):
        for row in conn.execute(
            "SELECT e.id, e.kind, e.at, e.body, e.device, e.device_type"
            f" FROM events e WHERE e.id IN ({_marks(len(part))})",
            part,
        ).fetchall():
            found[row[0]] = event_message(
                event_id=row[0],
                kind=row[1],
                at=row[2],
                body=json.loads(row[3]),
                device=row[4],
                device_type=row[5],
                gateway=gateway,
            )
    for entry in events:
        if entry.ref_id in found:
            messages[entry.id] = found[entry.ref_id]
    return messages


def event_message(
    *,
    event_id: int,
    kind: str,
    at: float,
    body: Mapping[str, Any],
    device: str,
    device_type: str,
    gateway: str,
) -> RelayMessage:
    """An event's message: id `e-<event id>`, no values, the body as `extra`."""
    return RelayMessage(
        message_id=f"e-{event_id}",
        kind=kind,
        device=device,
        device_type=device_type,
        gateway=gateway,
        device_time=None,
        received_at=at,
        values=(),
        extra=dict(body),
    )


class Outcome(NamedTuple):
    """What to write for one claimed entry."""

    entry: Entry
    settlement: Settlement
    error: str | None


def apply(conn: sqlite3.Connection, outcomes: Sequence[Outcome], *, now: float) -> None:
    """Write the settlements: delete the delivered, reschedule retries, move the dead."""
    delivered = [(o.entry.id,) for o in outcomes if o.settlement.state is DeliveryState.DELIVERED]
    retry = [
        (o.settlement.attempt, o.settlement.next_attempt_at, o.error, o.entry.id)
        for o in outcomes
        if o.settlement.state is DeliveryState.PENDING
    ]
    dead = [o for o in outcomes if o.settlement.state is DeliveryState.DEAD]
    conn.executemany("DELETE FROM outbox WHERE id = ?", delivered)
    conn.executemany(
        "UPDATE outbox SET state = 'pending', attempt = ?, next_attempt_at = ?, last_error = ?"
        " WHERE id = ?",
        retry,
    )
    conn.executemany(
        "INSERT INTO dead_letters (outbox_id, sink, kind, ref_id, device_id, encoding, attempt,"
        " first_at, dead_at, reason, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                o.entry.id,
                o.entry.sink,
                o.entry.kind,
                o.entry.ref_id,
                o.entry.device_id,
                o.entry.encoding.value,
                o.settlement.attempt,
                o.entry.first_at,
                now,
                o.settlement.reason or "permanent",
                o.error,
            )
            for o in dead
        ],
    )
    conn.executemany("DELETE FROM outbox WHERE id = ?", [(o.entry.id,) for o in dead])


async def drop_oldest(conn: aiosqlite.Connection, sink: str, count: int) -> int:
    """Delete the sink's `count` oldest pending entries (back-pressure policy drop_oldest)."""
    cursor = await conn.execute(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE sink = ?"
        " AND state = 'pending' ORDER BY id LIMIT ?)",
        (sink, count),
    )
    return cursor.rowcount


# ---------------------------------------------------------------- dead letters


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    sink: str
    kind: str
    message_id: str
    device: str | None
    encoding: str
    attempt: int
    first_at: float
    dead_at: float
    reason: str
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def message_id(kind: str, ref_id: int) -> str:
    return f"r-{ref_id}" if kind == "reading" else f"e-{ref_id}"


def _sink_filter(sink: str | None, ids: Sequence[int]) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if sink is not None:
        clauses.append("x.sink = ?")
        params.append(sink)
    if ids:
        clauses.append(f"x.id IN ({_marks(len(ids))})")
        params.extend(ids)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


async def list_dead_letters(
    conn: aiosqlite.Connection, *, sink: str | None = None, limit: int | None = None
) -> list[DeadLetter]:
    where, params = _sink_filter(sink, ())
    sql = (
        "SELECT x.id, x.sink, x.kind, x.ref_id, d.name, x.encoding, x.attempt, x.first_at,"
        " x.dead_at, x.reason, x.last_error"
        f" FROM dead_letters x LEFT JOIN devices d ON d.id = x.device_id{where} ORDER BY x.id"
    )
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    async with conn.execute(sql, params) as cursor:
        rows = await cursor.fetchall()
    return [
        DeadLetter(
            id=row[0],
            sink=row[1],
            kind=row[2],
            message_id=message_id(row[2], row[3]),
            device=row[4],
            encoding=row[5],
            attempt=row[6],
            first_at=row[7],
            dead_at=row[8],
            reason=row[9],
            last_error=row[10],
        )
        for row in rows
    ]


async def replay_dead_letters(
    conn: aiosqlite.Connection, *, now: float, sink: str | None = None, ids: Sequence[int] = ()
) -> int:
    """dead -> pending with attempt 0, due now; new outbox ids, so they queue at the end.

    Runs in the caller's transaction. Returns how many entries went back to the outbox.
    """
    where, params = _sink_filter(sink, ids)
    await conn.execute(
        "INSERT INTO outbox (sink, kind, ref_id, device_id, encoding, state, attempt, first_at,"
        " next_attempt_at, last_error)"
        " SELECT x.sink, x.kind, x.ref_id, x.device_id, x.encoding, 'pending', 0, ?, ?,"
        f" x.last_error FROM dead_letters x{where} ORDER BY x.id",
        [now, now, *params],
    )
    cursor = await conn.execute(f"DELETE FROM dead_letters AS x{where}", params)
    return cursor.rowcount


# ---------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class LiveFigures:
    """What only the running gateway knows, as it last wrote it to `relay_status`."""

    sink: str
    connected: bool
    sent: int
    retries: int
    dead: int
    dropped: int
    sent_per_s: float
    last_error: str | None
    last_error_at: float | None
    updated_at: float


async def write_status(
    conn: aiosqlite.Connection, figures: Sequence[LiveFigures], *, keep: Iterable[str]
) -> None:
    keep = list(keep)
    await conn.execute(f"DELETE FROM relay_status WHERE sink NOT IN ({_marks(len(keep))})", keep)
    await conn.executemany(
        "INSERT OR REPLACE INTO relay_status (sink, connected, sent, retries, dead, dropped,"
        " sent_per_s, last_error, last_error_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                f.sink,
                int(f.connected),
                f.sent,
                f.retries,
                f.dead,
                f.dropped,
                f.sent_per_s,
                f.last_error,
                f.last_error_at,
                f.updated_at,
            )
            for f in figures
        ],
    )


@dataclass(frozen=True, slots=True)
class SinkStatus:
    """One line of `gateway relay status`."""

    sink: str
    #: None when no running gateway reported recently.
    connected: bool | None
    depth: int
    in_flight: int
    oldest_age: float | None
    sent_per_s: float | None
    sent: int | None
    retries: int | None
    dead_letters: int
    dropped: int | None
    last_error: str | None
    last_error_at: float | None
    updated_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


async def read_status(
    conn: aiosqlite.Connection, *, now: float, stale_after: float
) -> list[SinkStatus]:
    """Per sink: the outbox and dead letters from the database, plus the live figures the
    gateway wrote (left out when older than `stale_after` seconds: no gateway running)."""
    outbox: dict[str, tuple[int, int, float | None]] = {}
    async with conn.execute(
        "SELECT sink, count(*), sum(state = 'in_flight'), min(first_at) FROM outbox GROUP BY sink"
    ) as cursor:
        for row in await cursor.fetchall():
            outbox[row[0]] = (int(row[1]), int(row[2] or 0), row[3])
    async with conn.execute("SELECT sink, count(*) FROM dead_letters GROUP BY sink") as cursor:
        dead = {row[0]: int(row[1]) for row in await cursor.fetchall()}
    live: dict[str, LiveFigures] = {}
    async with conn.execute(
        "SELECT sink, connected, sent, retries, dead, dropped, sent_per_s, last_error,"
        " last_error_at, updated_at FROM relay_status"
    ) as cursor:
        for row in await cursor.fetchall():
            live[row[0]] = LiveFigures(row[0], bool(row[1]), *row[2:])
    result = []
    for sink in sorted(set(outbox) | set(dead) | set(live)):
        depth, in_flight, oldest = outbox.get(sink, (0, 0, None))
        figures = live.get(sink)
        fresh = figures is not None and now - figures.updated_at <= stale_after
        result.append(
            SinkStatus(
                sink=sink,
                connected=figures.connected if fresh and figures else None,
                depth=depth,
                in_flight=in_flight,
                oldest_age=None if oldest is None else max(0.0, now - oldest),
                sent_per_s=figures.sent_per_s if fresh and figures else None,
                sent=figures.sent if figures else None,
                retries=figures.retries if figures else None,
                dead_letters=dead.get(sink, 0),
                dropped=figures.dropped if figures else None,
                last_error=figures.last_error if figures else None,
                last_error_at=figures.last_error_at if figures else None,
                updated_at=figures.updated_at if figures else None,
            )
        )
    return result
