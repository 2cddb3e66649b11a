"""The event stores behind resumable Streamable HTTP: replay after an event id, only within
one session, and bounded in count and age."""

from __future__ import annotations

import pytest
from mcp.server.streamable_http import EventMessage
from mcp.types import JSONRPCMessage, JSONRPCNotification, JSONRPCResponse

from claudecluster_mcp.event_store import ResumableStreams, SessionEvents

pytestmark = pytest.mark.anyio


def response(request_id: int) -> JSONRPCMessage:
    return JSONRPCResponse(jsonrpc="2.0", id=request_id, result={})


def progress(n: int) -> JSONRPCMessage:
    return JSONRPCNotification(jsonrpc="2.0", method="notifications/progress", params={"progress": n})


async def replay(store: SessionEvents, after: str) -> tuple[str | None, list[EventMessage]]:
    sent: list[EventMessage] = []

    async def send(event: EventMessage) -> None:
        sent.append(event)

    return await store.replay_events_after(after, send), sent


async def test_a_reconnecting_client_gets_what_its_stream_missed_and_nothing_else() -> None:
    session = ResumableStreams().session()
    priming = await session.store_event("5", None)
    first = await session.store_event("5", progress(1))
    await session.store_event("6", response(6))  # another request's stream
    await session.store_event("5", progress(2))
    await session.store_event("5", response(5))

    stream, sent = await replay(session, first)

    assert stream == "5"
    assert [e.message for e in sent] == [progress(2), response(5)]
    assert (await replay(session, priming))[1][0].message == progress(1)  # priming events are never sent


async def test_sessions_never_see_each_others_events_though_request_ids_collide() -> None:
    streams = ResumableStreams()
    mine, theirs = streams.session(), streams.session()
    cursor = await mine.store_event("1", None)
    await theirs.store_event("1", response(1))
    await mine.store_event("1", response(1))
    their_cursor = await theirs.store_event("1", progress(9))

    assert [e.event_id for e in (await replay(mine, cursor))[1]] != []
    assert await replay(mine, their_cursor) == (None, [])
    assert await replay(mine, "no-such-event") == (None, [])


async def test_the_oldest_events_go_first_beyond_the_bounds() -> None:
    streams = ResumableStreams(max_events=3)
    session = streams.session()
    ids = [await session.store_event("1", progress(n)) for n in range(5)]

    assert streams.size == 3 and session.size == 3
    assert await replay(session, ids[0]) == (None, [])  # expired: the client starts over
    assert [e.event_id for e in (await replay(session, ids[2]))[1]] == ids[3:]

    aged = ResumableStreams(max_age=-1)  # every event is already too old
    old = aged.session()
    gone = await old.store_event("1", progress(1))
    await old.store_event("1", progress(2))
    assert await replay(old, gone) == (None, [])
