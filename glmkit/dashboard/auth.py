"""Optional shared-token auth, checked on every request.

A browser opens ``/?token=...`` once; the reply sets an HttpOnly cookie and
redirects to the same URL without the token, so it does not linger in the
address bar or history.  Scripts send ``Authorization: Bearer <token>``.
The cookie holds an HMAC of the token, never the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlencode

from flask import Flask, Response, g, jsonify, redirect, request

COOKIE = "dashboard_session"
COOKIE_MAX_AGE = 30 * 24 * 3600


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


def _unauthorized() -> Response:
    if request.accept_mimetypes.accept_html and not request.path.startswith("/api/"):
        body = ("<!doctype html><title>Dashboard: sign in</title>"
                "<p>This dashboard needs its access token: open it as <code>/?token=&lt;TOKEN&gt;</code>.</p>")
        response = Response(body, status=401, mimetype="text/html")
    else:
        response = jsonify(error="unauthorized", hint="send 'Authorization: Bearer <token>' or open /?token=<token>")
        response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Bearer realm="dashboard"'
    return response


def install_token_auth(app: Flask, token: str) -> None:
    cookie_value = _cookie_value(token)

    @app.before_request
    def _check_token():
        if _matches(_bearer(), token) or _matches(request.cookies.get(COOKIE), cookie_value):
            return None
        if not _matches(request.args.get("token"), token):
            return _unauthorized()
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
