"""Keeping secrets out of everything claudecluster writes: redaction and private modes.

What counts as a secret:

- the value of every environment variable the agents could see (``os.environ`` and
  ``EngineSettings.agent_env``, registered with :func:`register_secrets`) whose *name* has a
  part ending in ``KEY``, ``TOKEN``, ``SECRET``, ``PASSWORD``, ``PASSWD``, ``PASSPHRASE`` or
  ``CREDENTIAL(S)`` (``ANTHROPIC_API_KEY``, ``AWS_SECRET_ACCESS_KEY``, ``CLAUDECLUSTER_TOKEN``,
  ``GOOGLE_APPLICATION_CREDENTIALS``; not ``MAX_THINKING_TOKENS``), at least
  :data:`MIN_SECRET_LENGTH` characters long so that ``1`` or ``true`` never matches;
- well-known token shapes wherever they appear (``sk-ant-…``, ``ghp_…``, ``AKIA…``, PEM
  private keys, ``Bearer …``).

A value becomes ``[redacted:ANTHROPIC_API_KEY]``, a shape ``[redacted:anthropic-key]``.
Redaction happens where text is written: the events table and task columns (the store), raw
transcripts (:class:`StreamRedactor`, which holds back a chunk's tail so that a secret split
across two pty reads is still caught), the package's log records (installed on import), and
reports. Text is redacted *before* it is truncated, so a cut never leaves half a secret.

:func:`private_dir` and :func:`private_file` give the state and transcript directories 0700
and their files 0600.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MIN_SECRET_LENGTH",
    "RedactingFilter",
    "Redactor",
    "StreamRedactor",
    "install_log_redaction",
    "is_secret_name",
    "private_dir",
    "private_file",
    "redact",
    "redact_data",
    "redactor",
    "register_secrets",
]

MIN_SECRET_LENGTH = 8
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "CREDENTIALS")

# label → pattern. Each pattern is ASCII and can match a partial secret at the end of a
# buffer (no required terminator), which is what StreamRedactor's hold-back relies on.
_SHAPES = {
    "anthropic_key": r"sk-ant-[A-Za-z0-9_\-]{16,}",
    "openai_key": r"sk-(?:proj-)?[A-Za-z0-9_\-]{32,}",
    "github_token": r"(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})",
    "gitlab_token": r"glpat-[A-Za-z0-9_\-]{20,}",
    "aws_access_key_id": r"(?:AKIA|ASIA)[0-9A-Z]{16}",
    "slack_token": r"xox[abposr]-[A-Za-z0-9\-]{10,}",
    "google_api_key": r"AIza[0-9A-Za-z_\-]{35}",
    "private_key": (
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:\\[nr]|\s|[A-Za-z0-9+/=])*(?:-----END [A-Z ]*PRIVATE KEY-----)?"
    ),
    "bearer_token": r"Bearer [A-Za-z0-9._~+/\-]{20,}=*",
}
# While streaming, the tail always kept back: longer than any shape's shortest match, so a
# token cut by a read is either whole in the tail or already matches (and is held from its
# start, up to _STREAM_HOLD bytes; a longer match is redacted in two parts).
_SHAPE_TAIL = 64
_STREAM_HOLD = 16384


@functools.lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """True for an environment variable whose value must never be written."""
    return any(part.endswith(_SECRET_WORDS) for part in re.split(r"[_\-.]", name.upper()) if part)


def _secret_values(env: Iterable[tuple[str, str]]) -> dict[str, str]:
    """value → name of every secret in ``env`` (the first name wins for shared values)."""
    found: dict[str, str] = {}
    for name, value in sorted(env):
        if is_secret_name(name) and len(value.strip()) >= MIN_SECRET_LENGTH:
            found.setdefault(value, name)
            escaped = json.dumps(value)[1:-1]  # as it appears inside a JSON string
            found.setdefault(escaped, name)
    return found


class Redactor:
    """Replaces known secret values and token shapes in text, data and byte streams."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = dict(values)  #: secret value → the variable it came from
        literals = sorted(self.values, key=len, reverse=True)
        alternatives = [f"(?P<literal>{'|'.join(map(re.escape, literals))})"] if literals else []
        alternatives += [f"(?P<{label}>{pattern})" for label, pattern in _SHAPES.items()]
        source = "|".join(alternatives)
        # The named groups say which secret matched, but they keep `re` from skipping straight
        # to the bytes a secret can start with (10-30x slower on a transcript, on the event
        # loop): matches are found by the same alternation without names, and each one is
        # named by the named pattern matched at its start (the same match).
        plain = "|".join([*map(re.escape, literals), *_SHAPES.values()])
        self._text, self._text_scan = re.compile(source), re.compile(plain)
        self._bytes, self._bytes_scan = re.compile(source.encode()), re.compile(plain.encode())
        self._bytes_values = {k.encode(): v for k, v in self.values.items()}
        self.longest = max((len(k.encode()) for k in self.values), default=0)

    def _label(self, group: str | None, matched: str) -> str:
        if group == "literal":
            return self.values.get(matched, "secret")
        return (group or "secret").replace("_", "-")

    def _label_of(self, named: re.Match[str] | None) -> str:
        assert named is not None  # the named pattern matches wherever the plain one does
        return self._label(named.lastgroup, named.group())

    def text(self, text: str) -> str:
        """``text`` with every secret replaced by ``[redacted:NAME]``."""
        return self._text_scan.sub(lambda m: f"[redacted:{self._label_of(self._text.match(text, m.start()))}]", text)

    def data(self, value: Any) -> Any:
        """A copy of JSON-like ``value`` (dicts, lists, strings) with every string redacted."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        return value

    def _named(self, found: re.Match[bytes]) -> re.Match[bytes]:
        """The named-pattern match of a match of the plain scan (same span, with its group)."""
        named = self._bytes.match(found.string, found.start())
        assert named is not None  # the named pattern matches wherever the plain one does
        return named

    def _bytes_marker(self, match: re.Match[bytes]) -> bytes:
        group = match.lastgroup
        if group == "literal":
            label = self._bytes_values.get(match.group(), "secret")
        else:
            label = (group or "secret").replace("_", "-")
        return f"[redacted:{label}]".encode()

    def stream(self) -> StreamRedactor:
        """A redactor for one byte stream written in chunks (a transcript)."""
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts a byte stream chunk by chunk. ``feed`` returns what is safe to write now and
    keeps back the tail that could still be the start of a secret; ``close`` flushes it.

    Kept back: the last ``max(longest secret - 1, 64)`` bytes (the head of a secret cut by
    the read), and from the start of any token-shape match that touches the end of the
    buffer (the rest of that token may be in the next chunk).
    """

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Bytes safe to write after ``chunk`` (possibly empty)."""
        buffer = self._pending + chunk
        out: list[bytes] = []
        start = 0
        cut = max(0, len(buffer) - max(self._redactor.longest - 1, _SHAPE_TAIL))
        for found in self._redactor._bytes_scan.finditer(buffer):
            match = self._redactor._named(found)
            touches_end = match.end() == len(buffer)
            if touches_end and match.lastgroup != "literal" and len(buffer) - match.start() < _STREAM_HOLD:
                cut = min(cut, match.start())
                break
            if match.start() >= cut:
                break
            out += [buffer[start : match.start()], self._redactor._bytes_marker(match)]
            start = match.end()
        cut = max(cut, start)
        # Never split a UTF-8 sequence: hold back continuation bytes at the cut.
        while cut > start and cut < len(buffer) and buffer[cut] & 0xC0 == 0x80:
            cut -= 1
        out.append(buffer[start:cut])
        self._pending = buffer[cut:]
        return b"".join(out)

    def close(self) -> bytes:
        """The rest of the stream, redacted."""
        rest, self._pending = self._pending, b""
        redactor = self._redactor
        return redactor._bytes_scan.sub(lambda found: redactor._bytes_marker(redactor._named(found)), rest)


# -- the process-wide redactor: os.environ plus the agents' registered environments ---------

_registered: dict[str, str] = {}


def register_secrets(env: Mapping[str, str]) -> None:
    """Also treat the secrets of ``env`` (e.g. ``EngineSettings.agent_env``) as secrets."""
    for name, value in env.items():
        if is_secret_name(name):
            _registered[f"{name}\0{value}"] = value


@functools.lru_cache(maxsize=32)
def _build(items: tuple[tuple[str, str], ...]) -> Redactor:
    return Redactor(_secret_values(items))


def redactor(extra_env: Mapping[str, str] | None = None) -> Redactor:
    """The redactor for secrets in ``os.environ``, registered environments and ``extra_env``."""
    items = [(k, v) for k, v in os.environ.items() if is_secret_name(k)]
    items += [(key.partition("\0")[0], value) for key, value in _registered.items()]
    if extra_env:
        items += [(k, v) for k, v in extra_env.items() if is_secret_name(k)]
    return _build(tuple(sorted(set(items))))


def redact(text: str) -> str:
    """``text`` with every known secret replaced (see :class:`Redactor`)."""
    return redactor().text(text)


def redact_data(value: Any) -> Any:
    """JSON-like ``value`` with every string redacted."""
    return redactor().data(value)


# -- logs ---------------------------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """Redacts a record's message, exception and stack text in place (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record``; always keep it."""
        _redact_record(record)
        return True


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: keep the raw parts, redacted
        message = f"{record.msg} {record.args}"
    record.msg, record.args = redact(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


_PACKAGE = __name__.rpartition(".")[0]
logger = logging.getLogger(__name__)


def install_log_redaction() -> None:
    """Redact every record of the package's loggers (``claudecluster_mcp`` and below), also
    of loggers created later. A filter on a logger sees only records logged on that very
    logger, so this wraps the record factory, for the package's records only. Idempotent."""
    current = logging.getLogRecordFactory()
    if getattr(current, "_claudecluster_redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        if record.name == _PACKAGE or record.name.startswith(_PACKAGE + "."):
            _redact_record(record)
        return record

    factory._claudecluster_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


install_log_redaction()


# -- private files ----------------------------------------------------------------------------


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it 0700: only its owner may enter."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _tighten(path, 0o700)
    return path


def private_file(path: Path, *, create: bool = True) -> Path:
    """Create ``path`` if missing (and ``create``) as an empty 0600 file, or make an existing
    one 0600. Not a regular file, or not ours to change: left as is, for whoever opens it to
    report."""
    try:
        if not create:
            raise FileExistsError(path)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        if path.is_file():
            _tighten(path, 0o600)
    return path


def _tighten(path: Path, mode: int) -> None:
    try:
        if path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)
    except FileNotFoundError:
        pass
    except PermissionError as exc:  # immutable, or someone else's: not fatal, but said
        logger.warning("cannot make %s private (mode %o): %s", path, mode, exc)
