"""Optional shared-token auth, checked on every request.

A browser opens ``/?token=...`` once; the reply sets an HttpOnly cookie and
redirects to the same URL without the token, so it does not linger in the
address bar or history.  Scripts send ``Authorization: Bearer <token>``.
The cookie holds an HMAC of the token, never the token itself.

Wrong tokens are limited per client address: after FailedTokens.limit wrong
tokens (query, header or cookie) within `window` seconds, that address's wrong
tokens get 429 until the oldest failure is a window old. The right token (and
a signed-in browser's cookie) always passes. Refusing it too would let anyone
who can reach the port lock everyone out, again and again: every browser
behind an SSH tunnel, and every user of the machine, is 127.0.0.1. What stops
guessing is the token's length (16+ characters, required off loopback: 64
bits or more of `openssl rand -hex 16`), not the limit; the limit keeps a
misconfigured script or a guesser from flooding the server and its logs.
Requests without any token are not counted: they get the sign-in page.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict, deque
from urllib.parse import urlencode

from flask import Flask, Response, g, jsonify, redirect, request

COOKIE = "dashboard_session"
COOKIE_MAX_AGE = 30 * 24 * 3600
# A page load fires about a dozen requests, each with a stale cookie after a token change, so the
# limit leaves room for that; a 16-character token still takes ages at this rate.
FAILURE_LIMIT = 20
FAILURE_WINDOW_SECONDS = 60.0
MAX_TRACKED_CLIENTS = 4096  # bounds memory under a flood of addresses; the oldest are forgotten


class FailedTokens:
    """Sliding-window count of wrong tokens per client address (thread-safe)."""

    def __init__(self, limit: int = FAILURE_LIMIT, window: float = FAILURE_WINDOW_SECONDS,
                 max_clients: int = MAX_TRACKED_CLIENTS, clock=time.monotonic):
        self.limit, self.window, self.max_clients, self.clock = limit, window, max_clients, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[client]
        return times

    def retry_after(self, client: str) -> float | None:
        """Seconds until `client` may try again, or None if it may try now."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            return times[0] + self.window - now if len(times) >= self.limit else None

    def record(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            self._failures[client] = times
            self._failures.move_to_end(client)
            times.append(now)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)


def _cookie_value(token: str) -> str:
    return hmac.new(token.encode(), b"glmkit-dashboard-cookie", hashlib.sha256).hexdigest()


def _matches(candidate: str | None, expected: str) -> bool:
    return candidate is not None and hmac.compare_digest(candidate.encode(), expected.encode())


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _url_without_token() -> str:
    query = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
    path = "/" + request.path.lstrip("/")  # "//host" would redirect off-site
    return path + ("?" + urlencode(query) if query else "")


def _refusal(status: int, text: str, hint: str) -> Response:
    if request.accept_mimetypes.accept_html and not request.path.startswith("/api/"):
        body = f"<!doctype html><title>Dashboard: sign in</title><p>{text}</p>"
        response = Response(body, status=status, mimetype="text/html")
    else:
        response = jsonify(error="unauthorized" if status == 401 else "too many wrong tokens", hint=hint)
        response.status_code = status
    return response


def _unauthorized() -> Response:
    response = _refusal(401, "This dashboard needs its access token: open it as <code>/?token=&lt;TOKEN&gt;</code>.",
                        "send 'Authorization: Bearer <token>' or open /?token=<token>")
    response.headers["WWW-Authenticate"] = 'Bearer realm="dashboard"'
    return response


def _too_many(wait: float) -> Response:
    seconds = max(1, math.ceil(wait))
    response = _refusal(429, f"Too many wrong tokens from your address: try again in {seconds} s.",
                        f"too many wrong tokens from this address; retry after {seconds} s")
    response.headers["Retry-After"] = str(seconds)
    return response


def install_token_auth(app: Flask, token: str, failures: FailedTokens | None = None) -> FailedTokens:
    cookie_value = _cookie_value(token)
    failures = failures or FailedTokens()

    @app.before_request
    def _check_token():
        bearer, cookie, query = _bearer(), request.cookies.get(COOKIE), request.args.get("token")
        if bearer is None and cookie is None and query is None:
            return _unauthorized()
        if _matches(bearer, token) or _matches(cookie, cookie_value):
            return None  # the right credentials pass, whatever others sent from the same address
        if not _matches(query, token):
            client = request.remote_addr or "?"
            wait = failures.retry_after(client)
            if wait is not None:
                return _too_many(wait)
            failures.record(client)
            response = _unauthorized()
            if cookie is not None:  # a stale cookie (the token changed) is sent once, not on every poll
                response.delete_cookie(COOKIE, samesite="Strict", httponly=True)
            return response
        g.grant_cookie = True
        if request.method == "GET" and not request.path.startswith("/api/"):
            return redirect(_url_without_token(), code=303)
        return None

    @app.after_request
    def _grant_cookie(response: Response) -> Response:
        if g.get("grant_cookie"):
            response.set_cookie(COOKIE, cookie_value, max_age=COOKIE_MAX_AGE, httponly=True,
                                samesite="Strict", secure=request.is_secure)
        return response

    return failures
