"""The one boundary where SQLite failures become :class:`~claudecluster_mcp.errors.StoreError`.

``sqlite3`` (and ``aiosqlite``, which passes its exceptions through) reports problems such
as "file is not a database" or "attempt to write a readonly database" without saying which
file or what to do. :func:`sqlite_errors` names the file and adds the remedy, chosen by
SQLite's primary result code; :func:`translate_sqlite_errors` applies it to every public
coroutine method of a class, so that no method of the store can leak a raw ``sqlite3.Error``.
"""

from __future__ import annotations

import functools
import inspect
import sqlite3
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .errors import StoreError

__all__ = ["REMEDIES", "sqlite_errors", "store_error", "translate_sqlite_errors"]

#: What a user can do, by SQLite primary result code (see https://sqlite.org/rescode.html).
REMEDIES: dict[int, str] = {
    sqlite3.SQLITE_NOTADB: "is not a SQLite database (corrupt?): move it aside to start fresh",
    sqlite3.SQLITE_CORRUPT: "is corrupt: move it aside (with its -wal and -shm files) to start fresh",
    sqlite3.SQLITE_READONLY: (
        "is read-only: check the permissions (and attributes, see lsattr) of the file and its "
        "directory, and that the disk is not mounted read-only"
    ),
    sqlite3.SQLITE_PERM: "cannot be accessed: check the permissions of the file and its directory",
    sqlite3.SQLITE_CANTOPEN: "cannot be opened: check that its directory exists and is writable",
    sqlite3.SQLITE_FULL: "cannot be written: the disk is full",
    sqlite3.SQLITE_IOERR: "hit an I/O error: check the disk",
    sqlite3.SQLITE_BUSY: "stayed locked by another process (another claudecluster?): try again",
    sqlite3.SQLITE_LOCKED: "stayed locked by another connection: try again",
    sqlite3.SQLITE_CONSTRAINT: "refused a write that breaks its schema (a bug: please report it)",
}


def store_error(what: str, path: Path, exc: sqlite3.Error) -> StoreError:
    """The :class:`StoreError` for ``exc`` raised on ``what`` (e.g. "the state database") at ``path``."""
    code = getattr(exc, "sqlite_errorcode", None)
    remedy = REMEDIES.get(code & 0xFF) if isinstance(code, int) else None
    if remedy is None:
        return StoreError(f"{what} {path}: {exc}")
    return StoreError(f"{what} {path} {remedy} (sqlite: {exc})")


@contextmanager
def sqlite_errors(what: str, path: Path) -> Iterator[None]:
    """Re-raise any ``sqlite3.Error`` inside the block as :func:`store_error` (chained)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise store_error(what, path, exc) from exc


_Method = Callable[..., Coroutine[Any, Any, Any]]
_C = TypeVar("_C", bound=type)


def _guarded(what: str, method: _Method) -> _Method:
    @functools.wraps(method)
    async def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        with sqlite_errors(what, self.path):
            return await method(self, *args, **kwargs)

    guarded.__sqlite_errors__ = what  # type: ignore[attr-defined]
    return guarded


def translate_sqlite_errors(what: str) -> Callable[[_C], _C]:
    """Class decorator: every public ``async def`` of the class (whose instances have a
    ``path``) runs inside :func:`sqlite_errors`. Context managers and class methods are not
    coroutine functions: they use :func:`sqlite_errors` themselves."""

    def decorate(cls: _C) -> _C:
        for name, member in list(vars(cls).items()):
            if not name.startswith("_") and inspect.iscoroutinefunction(member):
                setattr(cls, name, _guarded(what, member))
        return cls

    return decorate
