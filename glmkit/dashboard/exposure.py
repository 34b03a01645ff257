"""Who can reach the dashboard, and what that requires: the one exposure policy.

* A loopback bind (127.0.0.0/8, ::1, localhost) is private to this machine: no token is needed, but the
  Host header must name a loopback address, so a web page whose DNS name is rebound to 127.0.0.1 cannot
  read the API through the visitor's browser (DNS rebinding).
* Any other bind is reachable from the network: it needs DASHBOARD_TOKEN of at least MIN_TOKEN_CHARS
  characters, unless --no-auth says the network is trusted.

The command line, the gunicorn factory and launch_dashboard.sh (through `--print-plan`) all decide here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MIN_TOKEN_CHARS = 16
LOOPBACK_NAMES = ("localhost", "localhost.localdomain")
# Host header names always accepted on a loopback bind (browsers lower-case them).
LOOPBACK_HOST_HEADERS = ("localhost", "127.0.0.1", "[::1]")
_HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::[0-9]{1,5})?")
TOKEN_HINT = "export DASHBOARD_TOKEN=$(openssl rand -hex 16)"


class ExposureError(ValueError):
    """A refused combination of bind address and token; the message is one line saying what to do."""


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> None:
    """Rules for any token: it must fit in an `Authorization: Bearer` header."""
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ExposureError("DASHBOARD_TOKEN contains spaces or control characters; "
                            f"use letters and digits: {TOKEN_HINT}")


@dataclass(frozen=True)
class Exposure:
    host: str
    port: int
    loopback: bool
    token: str | None  # required on every request when set

    @property
    def bind(self) -> str:
        """host:port as gunicorn's --bind wants it."""
        return f"[{self.host.strip('[]')}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def warning(self) -> str | None:
        if not self.loopback and self.token is None:
            return f"WARNING: serving on {self.host} without authentication (--no-auth): trusted networks only"
        return None


def decide(host: str, port: int, token: str | None, no_auth: bool = False) -> Exposure:
    """Apply the policy; raises ExposureError with one line that says what to fix."""
    loopback = is_loopback(host)
    token = None if no_auth else (token or None)
    if token is not None:
        check_token(token)
    if not loopback and not no_auth:
        if token is None:
            raise ExposureError(f"refusing to serve on {host} without DASHBOARD_TOKEN: it is reachable from the "
                                f"network; {TOKEN_HINT}, or pass --no-auth on a trusted network")
        if len(token) < MIN_TOKEN_CHARS:
            raise ExposureError(f"DASHBOARD_TOKEN has {len(token)} characters; serving on {host} needs at least "
                                f"{MIN_TOKEN_CHARS}: {TOKEN_HINT}")
    return Exposure(host=host, port=port, loopback=loopback, token=token)


def host_header_names(bind_host: str) -> tuple[str, ...] | None:
    """Host header names a server bound to `bind_host` accepts, or None for any (an exposed bind).

    Only the name is checked, not the port, as Jupyter and webpack-dev-server do: a rebinding page
    is refused for its name, and `ssh -L 8080:127.0.0.1:5000` tunnels send `Host: localhost:8080`.
    """
    if not is_loopback(bind_host):
        return None
    own = f"[{bind_host.strip('[]')}]" if ":" in bind_host else bind_host.lower()
    return tuple(dict.fromkeys((*LOOPBACK_HOST_HEADERS, own)))


def host_header_name(value: str | None) -> str | None:
    """The name part of a Host header ('localhost:5000' -> 'localhost'), or None if malformed."""
    match = _HOST_HEADER.fullmatch((value or "").lower())
    return match.group(1) if match else None
