"""Resumable Streamable HTTP: the events of every SSE stream are kept for a while, so a client
whose connection drops (during a ``status`` long-poll, say) reconnects with ``Last-Event-ID``
and is sent what it missed, the answer included (SEP-1699). Every POST stream starts with a
priming event (an id and empty data) and a ``retry`` field, so that clients know where to
resume and how long to wait.

The SDK keeps one event store per server and keys streams by JSON-RPC request id, which
every session numbers from the start: two sessions both have a request ``5``. So each
session gets its own :class:`SessionEvents` (:meth:`ResumableStreams.install`), and a
``Last-Event-ID`` only ever replays its own session's events. Memory is bounded: at most
:data:`MAX_EVENTS` events for the whole server, none older than :data:`MAX_AGE` seconds.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Final

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.types import JSONRPCMessage

__all__ = ["MAX_AGE", "MAX_EVENTS", "RETRY_MS", "ResumableStreams", "SessionEvents"]

#: Events kept for the whole server (the oldest go first).
MAX_EVENTS: Final = 20_000
#: Seconds an event is kept: a client that stays away longer starts over.
MAX_AGE: Final = 600.0
#: How long clients are told to wait before reconnecting (the SSE ``retry`` field).
RETRY_MS: Final = 1000


class SessionEvents(EventStore):
    """The stored events of one session's streams (request streams and the GET stream)."""

    def __init__(self, owner: ResumableStreams) -> None:
        self._owner = owner
        self._streams: dict[StreamId, deque[tuple[EventId, JSONRPCMessage | None]]] = {}
        self._where: dict[EventId, StreamId] = {}

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        """Keep ``message`` (None: a priming event) as the next event of ``stream_id``."""
        event_id = self._owner.next_id()
        self._streams.setdefault(stream_id, deque()).append((event_id, message))
        self._where[event_id] = stream_id
        self._owner.stored(self, event_id)
        return event_id

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        """Send the events of ``last_event_id``'s stream that came after it; returns the
        stream's id, or None if that event is unknown (expired, or another session's)."""
        stream_id = self._where.get(last_event_id)
        if stream_id is None:
            return None
        after = False
        for event_id, message in list(self._streams.get(stream_id, ())):
            if after and message is not None:
                await send_callback(EventMessage(message, event_id))
            after = after or event_id == last_event_id
        return stream_id

    def forget_oldest(self, event_id: EventId) -> None:
        """Drop ``event_id``, the oldest event this session still holds in its stream."""
        stream_id = self._where.pop(event_id, None)
        if stream_id is None:
            return
        stream = self._streams[stream_id]
        if stream and stream[0][0] == event_id:
            stream.popleft()
        if not stream:
            del self._streams[stream_id]

    @property
    def size(self) -> int:
        """Events held."""
        return len(self._where)


class ResumableStreams:
    """The event stores of all sessions of one Streamable HTTP endpoint, bounded together."""

    def __init__(self, max_events: int = MAX_EVENTS, max_age: float = MAX_AGE) -> None:
        self.max_events = max_events
        self.max_age = max_age
        self._ids = itertools.count(1)
        self._order: deque[tuple[float, SessionEvents, EventId]] = deque()

    def next_id(self) -> EventId:
        """A fresh event id (unique on this server)."""
        return str(next(self._ids))

    def stored(self, session: SessionEvents, event_id: EventId) -> None:
        """Account for a new event; drop the oldest events over the bounds."""
        now = time.monotonic()
        self._order.append((now, session, event_id))
        while self._order and (len(self._order) > self.max_events or self._order[0][0] < now - self.max_age):
            _, owner, oldest = self._order.popleft()
            owner.forget_oldest(oldest)

    @property
    def size(self) -> int:
        """Events held, all sessions together."""
        return len(self._order)

    def session(self) -> SessionEvents:
        """A new session's event store."""
        return SessionEvents(self)

    def install(self, manager: StreamableHTTPSessionManager) -> None:
        """Give every session ``manager`` opens its own :class:`SessionEvents`."""
        admit = manager._admit_session

        # mcp 2.3 has no per-session event store hook; its transports read `_event_store` each time.
        def admit_with_events(requestor: Any) -> Any:
            transport = admit(requestor)
            if transport is not None:
                transport._event_store = self.session()
            return transport

        manager._admit_session = admit_with_events  # type: ignore[method-assign]
