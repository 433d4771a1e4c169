"""The relay's SQL: routes, the readings' cursors, the outbox, dead letters and status.

A sink's readings come from two places, read in one round: its outbox (retries, readings
held back behind an earlier entry of their device, events) and the routed readings after
its cursor in `relay_cursors` (migration 0008 says why). `pos` orders the two: an outbox
entry is due only once the cursor has passed the readings stored before it, and a reading
after the cursor goes out only if its device has no earlier entry in the outbox.

Functions taking a connection run inside the caller's transaction (the store writer's, or
the CLI's own); the writer-side ones change state only along `gateway.core.outbox`'s table.
Those of the worker's round take a blocking `sqlite3.Connection`, the others aiosqlite's.
Nothing here reads the clock: `now` comes in.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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


#: The routed readings of sink `?` after reading id `?`, as outbox entries (one per reading
#: and route, in reading then route order, like the rows of the `relay_queue` view).
#: The routed readings of sink `?` after reading id `?`: one row per reading and route row
#: (a route with several globs has several). CROSS JOIN keeps `readings` the outer loop, so
#: the rows come in id order without a sort, and a LIMIT stops the scan.
ROUTED_AFTER = (
    " FROM readings x CROSS JOIN devices d CROSS JOIN routes r"
    " WHERE x.id > ? AND d.id = x.device_id AND r.sink = ? AND r.kind = 'reading'"
    " AND d.type GLOB r.device_type AND d.name GLOB r.device"
)
QUEUE_AFTER_CURSOR = (
    "INSERT INTO outbox (sink, kind, ref_id, device_id, encoding, first_at, next_attempt_at,"
    " pos) SELECT r.sink, 'reading', x.id, x.device_id, r.encoding, x.received_at,"
    f" x.received_at, 2 * x.id{ROUTED_AFTER} GROUP BY x.id, r.route ORDER BY x.id, r.route"
)


async def sync_routes(conn: aiosqlite.Connection, routes: Sequence[RouteConfig]) -> None:
    """Replace the routes table with the configured routes (one row per glob combination),
    and keep the cursors in step: a sink routed for the first time starts at the end of
    `readings` (it relays what is stored from now on); a sink no longer routed gets the
    readings its cursor had not reached queued in its outbox, by the routes as they were,
    and loses its cursor, so that what it was owed is kept (as the outbox keeps entries of
    a sink no longer configured) and retention is not held back by a cursor that never
    moves again."""
    routed = {route.sink for route in routes}
    async with conn.execute("SELECT sink, reading_id FROM relay_cursors") as cursor:
        cursors = [(row[0], row[1]) for row in await cursor.fetchall()]
    for sink, reading_id in cursors:
        if sink not in routed:
            await conn.execute(QUEUE_AFTER_CURSOR, (reading_id, sink))
            await conn.execute("DELETE FROM relay_cursors WHERE sink = ?", (sink,))
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
    await conn.executemany(
        "INSERT OR IGNORE INTO relay_cursors (sink, reading_id)"
        " SELECT ?, coalesce(max(id), 0) FROM readings",
        [(sink,) for sink in sorted(routed)],
    )


async def release_all(conn: aiosqlite.Connection) -> int:
    """After a crash: entries claimed but never settled go back to pending."""
    cursor = await conn.execute(
        "UPDATE outbox SET state = 'pending' WHERE state = 'in_flight'",
    )
    return cursor.rowcount


async def depths(conn: aiosqlite.Connection) -> dict[str, int]:
    """Per sink, what it still has to send: outbox entries and routed readings after its
    cursor."""
    async with conn.execute("SELECT sink, count(*) FROM relay_queue GROUP BY sink") as cursor:
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
    "id, sink, kind, ref_id, device_id, encoding, attempt, first_at, state, next_attempt_at, pos"
)
SELECT_WINDOW = f"SELECT {WINDOW_COLUMNS} FROM outbox WHERE sink = ? ORDER BY pos, id LIMIT ?"
SELECT_AFTER = (
    f"SELECT {WINDOW_COLUMNS} FROM outbox WHERE sink = ? AND (pos, id) > (?, ?){{}}"
    " ORDER BY pos, id LIMIT ?"
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
    conn: sqlite3.Connection,
    sink: str,
    *,
    now: float,
    limit: int,
    window: int,
    due_to: int | None = None,
) -> tuple[BatchPlan, dict[int, Any]]:
    """Plan the sink's next batch from its oldest `window` unfinished entries, reading
    them in (pos, id) order only as far as the plan needs (see `BatchPlanner`); the plan,
    and the rows read by id (what `claim_next` makes its entries of).

    An entry whose `pos` is past `due_to` waits for the cursor to pass the readings stored
    before it (which may still be on their way): it blocks its device like an entry not
    yet due, and the plan asks to be made again at once.

    A window taken up by devices that wait (in flight, or for a retry) would hold back
    every device after it, so while the batch has room the round reads on past it,
    leaving those devices out of the query: each later row of theirs would be skipped
    anyway, and a device first met there is still read in order.
    """
    planner = BatchPlanner(now=now, limit=limit)
    # Not yet due, and due the moment after now: the worker comes back at once.
    behind_cursor = math.nextafter(now, math.inf)
    rows: dict[int, Any] = {}
    query = SELECT_WINDOW
    params: tuple[Any, ...] = (sink, window)
    for _ in range(1 + MAX_WINDOWS_PAST_BLOCKED):
        read, last = 0, (0, 0)
        cursor = conn.execute(query, params)
        try:
            for row in cursor:
                read, last = read + 1, (row[10], row[0])
                rows[row[0]] = row
                due = row[9] if due_to is None or row[10] <= due_to else behind_cursor
                # The planner keys order by device; the device id is as good as its name.
                offered = OutboxRow(row[0], str(row[4]), _STATES[row[8]], due)
                if not planner.offer(offered):
                    return planner.plan(), rows
        finally:
            cursor.close()
        blocked = planner.blocked
        if read < window or len(blocked) > MAX_BLOCKED_LEFT_OUT:
            break
        leave_out = f" AND device_id NOT IN ({_marks(len(blocked))})" if blocked else ""
        query = SELECT_AFTER.format(leave_out)
        params = (sink, *last, *(int(device) for device in blocked), window)
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


class Streamed(NamedTuple):
    """A routed reading read after the sink's cursor, with its message."""

    reading_id: int
    device_id: int
    encoding: Encoding
    #: Its device has an earlier entry in the outbox: it is queued behind it, not sent.
    held: bool
    message: RelayMessage

    @property
    def first_at(self) -> float:
        """When it was received: what `max_age` counts from."""
        return self.message.received_at


#: `ROUTED_AFTER` with what a message needs (`READING_SELECT`'s columns first) and whether
#: the device has an earlier entry in the outbox; the caller keeps one row per route.
SELECT_STREAM = (
    "SELECT x.id, d.name, d.type, x.measurement, x.value, x.kind, x.unit, x.device_time,"
    " x.received_at, x.seq, x.device_id, r.route, r.encoding,"
    " EXISTS (SELECT 1 FROM outbox o WHERE o.sink = r.sink AND o.device_id = x.device_id"
    f" AND o.pos < 2 * x.id){ROUTED_AFTER} ORDER BY x.id LIMIT ?"
)
#: `ROUTED_AFTER` as (reading id, route) pairs only; a pair repeats for a route with several
#: glob rows.
SELECT_STREAM_ENTRIES = f"SELECT x.id, r.route{ROUTED_AFTER} ORDER BY x.id LIMIT ?"
SELECT_CURSOR = "SELECT reading_id FROM relay_cursors WHERE sink = ?"
#: Route rows that take readings to sink `?`: at most this many entries per reading.
COUNT_READING_ROUTES = "SELECT count(*) FROM routes WHERE sink = ? AND kind = 'reading'"
ADVANCE_CURSOR = "UPDATE relay_cursors SET reading_id = max(reading_id, ?) WHERE sink = ?"


def read_stream(
    conn: sqlite3.Connection, sink: str, *, after: int, limit: int, gateway: str
) -> tuple[list[Streamed], int]:
    """At most `limit` entries (whole readings, but at least one) of the routed readings
    after reading id `after`; and the reading id they reach: the last one taken, or the last
    one stored when fewer were found (the readings between are routed elsewhere)."""
    route_rows = conn.execute(COUNT_READING_ROUTES, (sink,)).fetchone()[0]
    if route_rows == 0:
        return [], conn.execute("SELECT coalesce(max(id), ?) FROM readings", (after,)).fetchone()[0]
    # One row more than the batch can take: a full fetch shows where its last reading ends.
    fetch = limit * route_rows + 1
    rows = conn.execute(SELECT_STREAM, (after, sink, fetch)).fetchall()
    full = len(rows) == fetch
    streamed: list[Streamed] = []
    taken = (0, -1)
    for row in rows:
        if (row[0], row[11]) == taken:
            continue  # another glob row of a route already taken
        # A new reading when the batch is full, or the last reading read, whose rows the
        # LIMIT may have cut: left for the next round (unless it is the only one).
        last_read = full and row[0] == rows[-1][0]
        if streamed and row[0] != taken[0] and (len(streamed) >= limit or last_read):
            return streamed, streamed[-1].reading_id
        taken = (row[0], row[11])
        message = _reading_message(row, gateway)
        streamed.append(Streamed(row[0], row[10], _ENCODINGS[row[12]], bool(row[13]), message))
    if full and streamed:
        return streamed, streamed[-1].reading_id
    last = conn.execute("SELECT coalesce(max(id), 0) FROM readings").fetchone()[0]
    return streamed, max(last, after)


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one round claimed: the outbox entries in (pos, id) order and their messages
    by entry id (missing where the source row is gone), then the readings read after the
    cursor, which reach `stream_to` (None: the stream was not read, or its cursor was moved
    in the round itself, having nothing for the sink). When nothing was due, `wake_at` is
    the earliest retry (None: nothing waits)."""

    entries: list[Entry]
    messages: dict[int, RelayMessage]
    wake_at: float | None
    streamed: list[Streamed] = field(default_factory=list)
    stream_to: int | None = None

    @property
    def empty(self) -> bool:
        return not self.entries and not self.streamed


def claim_next(
    conn: sqlite3.Connection,
    sink: str,
    *,
    now: float,
    limit: int,
    window: int,
    gateway: str,
    stream_from: int | None = None,
) -> Claimed:
    """Plan the sink's next batch and claim it, with the messages to send: due outbox
    entries first (they are older), then readings after the cursor, or after `stream_from`
    when an earlier batch read up to there is still being published."""
    row = conn.execute(SELECT_CURSOR, (sink,)).fetchone()
    cursor = None if row is None else int(row[0])
    due_to = None if cursor is None else 2 * cursor + 1
    plan, rows = plan_window(conn, sink, now=now, limit=limit, window=window, due_to=due_to)
    ids = [row.id for row in plan.send]
    mark_in_flight(conn, ids)
    entries = [_entry(rows[entry_id]) for entry_id in ids]
    messages = load_messages(conn, entries, gateway=gateway)
    room = limit - len(entries)
    if cursor is None or room <= 0:
        return Claimed(entries, messages, plan.wake_at)
    start = max(cursor, stream_from or 0)
    streamed, stream_to = read_stream(conn, sink, after=start, limit=room, gateway=gateway)
    if not streamed and start == cursor:
        # Nothing for this sink up to there, and nothing before it in flight: moved now.
        if stream_to > cursor:
            conn.execute(ADVANCE_CURSOR, (stream_to, sink))
        return Claimed(entries, messages, plan.wake_at)
    return Claimed(entries, messages, plan.wake_at, streamed, stream_to)


def release(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    """in_flight -> pending without counting an attempt (cancelled, not failed)."""
    for part in _chunks(ids):
        conn.execute(
            f"UPDATE outbox SET state = 'pending' WHERE id IN ({_marks(len(part))})"
            " AND state = 'in_flight'",
            part,
        )


def _reading_message(row: Any, gateway: str) -> RelayMessage:
    """The message of a row whose first columns are `READING_SELECT`'s."""
    return reading_message(
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
            found[row[0]] = _reading_message(row, gateway)
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


INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (outbox_id, sink, kind, ref_id, device_id, encoding, attempt,"
    " first_at, dead_at, reason, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _given_up(
    encoding: Encoding, settlement: Settlement, first_at: float, now: float, error: str | None
) -> tuple[Any, ...]:
    """A dead letter's columns after the entry's identity (`INSERT_DEAD_LETTER`)."""
    return (
        encoding.value,
        settlement.attempt,
        first_at,
        now,
        settlement.reason or "permanent",
        error,
    )


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
        INSERT_DEAD_LETTER,
        [
            (
                *(o.entry.id, o.entry.sink, o.entry.kind, o.entry.ref_id, o.entry.device_id),
                *_given_up(o.entry.encoding, o.settlement, o.entry.first_at, now, o.error),
            )
            for o in dead
        ],
    )
    conn.executemany("DELETE FROM outbox WHERE id = ?", [(o.entry.id,) for o in dead])


class StreamOutcome(NamedTuple):
    """What to write for one reading published from the stream (or held back)."""

    entry: Streamed
    #: None: held back, not sent; it is queued in the outbox, due now.
    settlement: Settlement | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Settled:
    """A published batch's outcomes, for the round that writes them."""

    outcomes: Sequence[Outcome] = ()
    streamed: Sequence[StreamOutcome] = ()
    #: Where the batch's readings reached (None: it read none).
    stream_to: int | None = None

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.streamed or self.stream_to is not None)


NO_OUTCOMES = Settled()


def settle(conn: sqlite3.Connection, sink: str, settled: Settled, *, now: float) -> None:
    """Write a batch's outcomes: its outbox entries' (`apply`), and for the readings read
    after the cursor, queue in the outbox those to retry or held back, move the dead to the
    dead letters, and move the cursor past them all. Nothing is written for a reading that
    was delivered: the cursor passing it is its settlement."""
    apply(conn, settled.outcomes, now=now)
    queued: list[tuple[Streamed, int, float | None, str | None]] = []
    dead: list[StreamOutcome] = []
    for outcome in settled.streamed:
        entry, settlement = outcome.entry, outcome.settlement
        if settlement is None:
            queued.append((entry, 0, now, None))
        elif settlement.state is DeliveryState.PENDING:
            queued.append((entry, settlement.attempt, settlement.next_attempt_at, outcome.error))
        elif settlement.state is DeliveryState.DEAD:
            dead.append(outcome)
    conn.executemany(
        "INSERT INTO outbox (sink, kind, ref_id, device_id, encoding, attempt, first_at,"
        " next_attempt_at, last_error, pos) VALUES (?, 'reading', ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                sink,
                e.reading_id,
                e.device_id,
                e.encoding.value,
                attempt,
                e.first_at,
                at,
                error,
                2 * e.reading_id,
            )
            for e, attempt, at, error in queued
        ],
    )
    # outbox_id 0: it never had an outbox entry.
    conn.executemany(
        INSERT_DEAD_LETTER,
        [
            (
                *(0, sink, "reading", o.entry.reading_id, o.entry.device_id),
                *_given_up(o.entry.encoding, o.settlement, o.entry.first_at, now, o.error),
            )
            for o in dead
            if o.settlement is not None
        ],
    )
    if settled.stream_to is not None:
        conn.execute(ADVANCE_CURSOR, (settled.stream_to, sink))


async def drop_oldest(conn: aiosqlite.Connection, sink: str, count: int) -> int:
    """Give up on the sink's `count` oldest pending entries (back-pressure policy
    drop_oldest): outbox entries first, then readings after the cursor, which it passes.
    Readings already read past the cursor by a batch on its way are still sent."""
    cursor = await conn.execute(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE sink = ?"
        " AND state = 'pending' ORDER BY pos, id LIMIT ?)",
        (sink, count),
    )
    dropped = cursor.rowcount
    if dropped < count:
        # The cursor moves to the reading of the last entry dropped (a reading two routes
        # take is two entries: the count may stop within it, and it goes whole).
        cursor = await conn.execute(SELECT_CURSOR, (sink,))
        row = await cursor.fetchone()
        if row is None:
            return dropped
        cursor = await conn.execute(COUNT_READING_ROUTES, (sink,))
        route_rows = (await cursor.fetchone() or (0,))[0]
        cursor = await conn.execute(
            SELECT_STREAM_ENTRIES, (row[0], sink, (count - dropped) * route_rows)
        )
        entries = list(dict.fromkeys(await cursor.fetchall()))[: count - dropped]
        if entries:
            await conn.execute(ADVANCE_CURSOR, (entries[-1][0], sink))
            dropped += len(entries)
    return dropped


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
        " next_attempt_at, last_error, pos)"
        " SELECT x.sink, x.kind, x.ref_id, x.device_id, x.encoding, 'pending', 0, ?, ?,"
        " x.last_error, 2 * (SELECT coalesce(max(id), 0) FROM readings) + 1"
        f" FROM dead_letters x{where} ORDER BY x.id",
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
    """Per sink: what it has to send and its dead letters from the database, plus the live
    figures the gateway wrote (left out when older than `stale_after` seconds: no gateway
    running)."""
    outbox: dict[str, tuple[int, int, float | None]] = {}
    async with conn.execute(
        "SELECT sink, count(*), sum(state = 'in_flight'), min(first_at) FROM relay_queue"
        " GROUP BY sink"
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
