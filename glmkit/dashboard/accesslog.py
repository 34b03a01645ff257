"""Server log lines without the access token.

A browser signs in with `/?token=...`, and both servers log request lines: gunicorn's access log
(`"GET /?token=... HTTP/1.1"`, and its error log on a failed request) and Werkzeug's, Flask's own
server. A filter on those loggers rewrites every record before any handler sees it: each `token=`
query value (also percent-encoded), the value of every query parameter whose name decodes to `token`
(`?tok%65n=`: Werkzeug decodes names, so the app reads it as the token), any value that decodes to one
holding the configured token, and the configured token itself, wherever it appears, become
`[redacted]`. It is installed by create_app, so every way of serving the app gets it.
"""

from __future__ import annotations

import logging
import re
import threading
from urllib.parse import unquote_plus

REDACTED = "[redacted]"
# `token=`, `token%3D` (an encoded query inside a query); the value runs to the next separator, quote,
# blank or escape character (Werkzeug colours its lines).
_TOKEN_PARAM = re.compile(r"(token(?:=|%3d))[^&;\s\"'#\x1b]*", re.IGNORECASE)
# Any query parameter `name=value` (after `?` or `&`), to compare its name and value decoded.
_QUERY_PAIR = re.compile(r"([?&])([^=&;\s\"'#\x1b?]+)=([^&;\s\"'#\x1b]*)")
SERVER_LOGGERS = ("werkzeug", "gunicorn.access", "gunicorn.error")


def _decoded(text: str) -> str:
    """`text` percent-decoded until it stops changing (a few rounds: %2565 -> %65 -> e)."""
    for _ in range(4):
        decoded = unquote_plus(text)
        if decoded == text:
            break
        text = decoded
    return text


def redact(text: str, secrets: frozenset[str] | set[str] = frozenset()) -> str:
    def pair(match: re.Match) -> str:
        separator, name, value = match.groups()
        plain = _decoded(value)
        if _decoded(name).lower() == "token" or any(secret in plain for secret in secrets):
            return f"{separator}{name}={REDACTED}"
        return match.group(0)

    text = _QUERY_PAIR.sub(pair, text)
    text = _TOKEN_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


class RedactTokens(logging.Filter):
    """Rewrites a record's message with the token removed; never drops a record."""

    def __init__(self):
        super().__init__()
        self.secrets: set[str] = set()
        self._lock = threading.Lock()

    def add_secret(self, secret: str) -> None:
        with self._lock:
            self.secrets.add(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report, not ours
            return True
        clean = redact(message, frozenset(self.secrets))
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactTokens()


def redact_server_logs(token: str | None, extra_loggers: tuple[logging.Logger, ...] = ()) -> None:
    """Install the filter (once per logger) on the servers' loggers and remember `token`."""
    if token:
        _FILTER.add_secret(token)
    for logger in (*(logging.getLogger(name) for name in SERVER_LOGGERS), *extra_loggers):
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
