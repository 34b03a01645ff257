"""Serving the dashboard: who may reach it, and what the servers write down.

The exposure policy (glmkit/dashboard/exposure.py) through the CLI, the gunicorn factory and
launch_dashboard.sh; token auth, the per-client limit on wrong tokens and the Host check against DNS
rebinding through Flask's test client and real servers on 127.0.0.1; the access logs of Werkzeug's and
gunicorn's servers read back from the real files they write.
"""

from __future__ import annotations

import http.client
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, free_port, wait_until_healthy
from fakes import FakeRun, finished_run

from glmkit.dashboard import create_app
from glmkit.dashboard.auth import FAILURE_LIMIT, FailedTokens
from glmkit.dashboard.defaults import DEFAULTS

LAUNCHER = os.path.join(ROOT, "launch_dashboard.sh")
TOKEN = "3f9c2a71d04be865c1a7"  # 20 characters: long enough to expose the dashboard
HAS_GUNICORN = importlib.util.find_spec("gunicorn") is not None


def make_client(run, **kwargs):
    kwargs.setdefault("min_poll_interval", 0)
    return create_app(run.logs_dir, **kwargs).test_client()


def request(url: str, path: str, headers: dict | None = None, host: str | None = None):
    """(status, headers, body) of a GET to a real server, with any Host header (urllib would not send one)."""
    address = url.removeprefix("http://")
    conn = http.client.HTTPConnection(*address.rsplit(":", 1), timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host or address)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def run(tmp_path):
    fake = FakeRun(tmp_path / "run", total_steps=100)
    fake.start()
    fake.steps(1, 3)
    return fake


@pytest.fixture
def no_dashboard_env(monkeypatch):
    for name in [k for k in os.environ if k.startswith("DASHBOARD_")]:
        monkeypatch.delenv(name)


def launcher_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASHBOARD_")}
    return {**env, "PYTHON": sys.executable, **extra}


def launch(*args, env=None):
    return subprocess.run(["bash", LAUNCHER, *args], env=launcher_env(**(env or {})), capture_output=True,
                          text=True, timeout=60)


# -- defaults and the exposure policy --------------------------------------------


def test_defaults_are_defined_once(tmp_path, no_dashboard_env, monkeypatch):
    from glmkit.dashboard.cli import app_from_env, build_parser

    args = build_parser().parse_args(["--logs", str(tmp_path)])
    assert (args.host, args.port, args.smoothing, args.stall_seconds, args.refresh) == \
        (DEFAULTS.host, DEFAULTS.port, DEFAULTS.smoothing, DEFAULTS.stall_seconds, DEFAULTS.refresh_seconds)
    signature = inspect.signature(create_app).parameters
    for name in ("smoothing", "stall_seconds", "refresh_seconds", "min_poll_interval"):
        assert signature[name].default == getattr(DEFAULTS, name)
    assert signature["bind_host"].default == DEFAULTS.host
    monkeypatch.setenv("DASHBOARD_LOGS_DIR", str(tmp_path))
    state = app_from_env().extensions["glmkit_dashboard"]
    assert (state.smoothing, state.stall_seconds, state.refresh_seconds) == \
        (DEFAULTS.smoothing, DEFAULTS.stall_seconds, DEFAULTS.refresh_seconds)


def test_cli_plan_and_refusals(tmp_path, no_dashboard_env, monkeypatch, capsys):
    from glmkit.dashboard.cli import main

    logs = str(tmp_path / "logs")
    assert main(["--logs", logs, "--print-plan"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"LOGS_DIR={logs}", f"OUTPUT_DIR={tmp_path}", "HOST=127.0.0.1", "PORT=5000", "BIND=127.0.0.1:5000",
        "LOOPBACK=1", f"THREADS={DEFAULTS.threads}"]
    assert main(["--logs", logs, "--host", "::1", "--port", "5050", "--print-plan"]) == 0
    assert "BIND=[::1]:5050" in capsys.readouterr().out

    def refused(*argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            code = main(["--logs", logs, *argv, "--print-plan"])
            raise SystemExit(code)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "DASHBOARD_TOKEN" in refused("--host", "0.0.0.0")
    monkeypatch.setenv("DASHBOARD_TOKEN", "fifteen-chars-x")
    assert "at least 16" in refused("--host", "0.0.0.0")
    assert "at least 16" in refused("--host", "192.168.1.20")
    assert "--port" in refused("--port", "99999")
    monkeypatch.setenv("DASHBOARD_TOKEN", "has a space in it, too long")
    assert "spaces" in refused()
    monkeypatch.setenv("DASHBOARD_TOKEN", "tok")  # a short token is fine on loopback
    assert main(["--logs", logs, "--print-plan"]) == 0
    monkeypatch.setenv("DASHBOARD_TOKEN", TOKEN)
    assert main(["--logs", logs, "--host", "0.0.0.0", "--print-plan"]) == 0
    assert "LOOPBACK=0" in capsys.readouterr().out
    monkeypatch.delenv("DASHBOARD_TOKEN")
    assert main(["--logs", logs, "--host", "0.0.0.0", "--no-auth", "--print-plan"]) == 0
    assert "without authentication" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text("paths: [unclosed\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(bad)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip() and "Traceback" not in err


def test_gunicorn_factory_applies_the_same_policy(tmp_path, no_dashboard_env, monkeypatch):
    from glmkit.dashboard.cli import app_from_env

    monkeypatch.setenv("DASHBOARD_LOGS_DIR", str(tmp_path))
    monkeypatch.setenv("DASHBOARD_HOST", "0.0.0.0")
    with pytest.raises(SystemExit, match="DASHBOARD_TOKEN"):
        app_from_env()
    monkeypatch.setenv("DASHBOARD_TOKEN", "short")
    with pytest.raises(SystemExit, match="at least 16"):
        app_from_env()
    monkeypatch.setenv("DASHBOARD_TOKEN", TOKEN)
    client = app_from_env().test_client()
    assert client.get("/api/stats", headers={**bearer(TOKEN), "Host": "10.1.2.3:5000"}).status_code == 200
    monkeypatch.setenv("DASHBOARD_HOST", "127.0.0.1")
    client = app_from_env().test_client()
    assert client.get("/api/stats", headers={**bearer(TOKEN), "Host": "10.1.2.3:5000"}).status_code == 400


# -- token auth -------------------------------------------------------------------


def test_token_auth(run):
    client = make_client(run, token="s3cret")
    assert client.get("/api/stats").status_code == 401
    assert client.get("/api/stats", headers=bearer("wrong")).status_code == 401
    assert client.get("/", headers={"Accept": "text/html"}).status_code == 401
    assert client.get("/api/stats", headers=bearer("s3cret")).status_code == 200

    browser = make_client(run, token="s3cret")
    response = browser.get("/?token=s3cret&x=1")
    assert response.status_code == 303 and response.headers["Location"] == "/?x=1"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "s3cret" not in cookie
    assert browser.get("/api/stats").status_code == 200  # the cookie now carries it
    assert browser.get("/api/plots/loss.png").status_code == 200

    scripted = make_client(run, token="s3cret")
    assert scripted.get("/api/stats?token=s3cret").status_code == 200
    assert scripted.get("/api/stats").status_code == 200
    assert make_client(run, token="s3cret").get("/api/stats?token=nope").status_code == 401
    offsite = make_client(run, token="s3cret").get("/%2F%2Fevil.example/?token=s3cret")
    assert not offsite.headers["Location"].startswith("//")  # a protocol-relative URL would leave the site


def test_wrong_tokens_are_limited_per_client_and_never_lock_out_the_right_one(run):
    """Everyone behind an SSH tunnel is 127.0.0.1: 20 wrong guesses used to refuse the right token for a minute
    to all of them. Now only wrong tokens from that address wait; the right token, a new sign-in and a
    signed-in browser's cookie pass."""
    client = make_client(run, token=TOKEN)
    tunnel, other = {"REMOTE_ADDR": "127.0.0.1"}, {"REMOTE_ADDR": "10.0.0.8"}
    signed_in = make_client(run, token=TOKEN)
    assert signed_in.get(f"/?token={TOKEN}", environ_base=tunnel).status_code == 303
    for i in range(FAILURE_LIMIT):
        assert client.get(f"/api/stats?token=guess{i}", environ_base=tunnel).status_code == 401
    limited = client.get("/api/stats", headers=bearer("guess-21"), environ_base=tunnel)
    assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "retry after" in limited.get_json()["hint"]
    assert client.get("/api/stats?token=guess-22", environ_base=tunnel).status_code == 429
    assert client.get("/api/stats", headers=bearer(TOKEN), environ_base=tunnel).status_code == 200
    assert make_client(run, token=TOKEN).get(f"/?token={TOKEN}", environ_base=tunnel).status_code == 303
    assert signed_in.get("/api/stats", environ_base=tunnel).status_code == 200
    assert client.get("/api/stats", headers=bearer("guess-23"), environ_base=other).status_code == 401
    assert client.get("/api/stats", environ_base=tunnel).status_code == 401  # no token: the sign-in answer


def test_a_stale_cookie_is_cleared_once(run):
    client = make_client(run, token=TOKEN)
    client.set_cookie("dashboard_session", "cookie-of-an-older-token")
    response = client.get("/api/stats")
    assert response.status_code == 401
    assert "dashboard_session=;" in response.headers["Set-Cookie"]  # expired: the next poll sends none
    assert client.get_cookie("dashboard_session") is None


def test_failed_token_window_forgets_and_stays_bounded():
    now = [100.0]
    failures = FailedTokens(limit=3, window=10.0, max_clients=2, clock=lambda: now[0])
    for _ in range(3):
        assert failures.retry_after("a") is None
        failures.record("a")
    assert failures.retry_after("a") == pytest.approx(10.0)
    now[0] += 6
    assert failures.retry_after("a") == pytest.approx(4.0)
    now[0] += 4
    assert failures.retry_after("a") is None  # the oldest failure left the window
    failures.record("b")
    failures.record("c")
    failures.record("d")
    assert len(failures._failures) == 2  # the least recently failing client is forgotten


# -- the Host header on loopback binds (DNS rebinding) ---------------------------


@pytest.mark.parametrize("host, status", [
    ("localhost:5000", 200), ("127.0.0.1:5000", 200), ("[::1]:5000", 200),
    ("localhost:8080", 200),  # an `ssh -L 8080:127.0.0.1:5000` tunnel: only the name is checked
    ("evil.example:5000", 400), ("127.0.0.1.nip.io:5000", 400), ("", 400), ("local host", 400),
])
def test_host_header_must_name_this_machine(run, host, status):
    response = make_client(run).get("/api/stats", headers={"Host": host})
    assert response.status_code == status
    if status == 400:
        assert "loopback" in response.get_json()["detail"]


def test_host_check_comes_before_the_token_and_only_on_loopback(run):
    rebound = {"Host": "attacker.example:5000"}
    assert make_client(run, token=TOKEN).get("/api/stats", headers={**rebound, **bearer(TOKEN)}).status_code == 400
    exposed = make_client(run, token=TOKEN, bind_host="0.0.0.0")
    assert exposed.get("/api/stats", headers={"Host": "gpu-node-7:5000", **bearer(TOKEN)}).status_code == 200


# -- real servers and their real logs ---------------------------------------------


def test_flask_server_log_never_shows_the_token(tmp_path, serve_dashboard):
    run = finished_run(tmp_path / "run")
    server = serve_dashboard(run.logs_dir, token=TOKEN)
    url, port = server.url, server.port
    status, headers, _ = request(url, f"/?token={TOKEN}&view=1")
    assert status == 303 and headers["Location"] == "/?view=1"
    assert request(url, f"/api/stats?token={TOKEN}")[0] == 200
    assert request(url, "/api/stats?token=wrong-guess-one")[0] == 401
    assert request(url, "/api/stats", bearer(TOKEN), host=f"evil.example:{port}")[0] == 400
    assert request(url, "/api/stats", bearer(TOKEN), host=f"localhost:{port}")[0] == 200
    # Werkzeug decodes parameter names (and values): `tok%65n` is the token parameter, the value encoded in part
    encoded = "%" + TOKEN[0].encode().hex() + TOKEN[1:]
    assert request(url, f"/api/stats?tok%65n={encoded}")[0] == 200
    assert request(url, "/api/stats?tok%65n=wrong-guess-two&x=1")[0] == 401
    for i in range(FAILURE_LIMIT - 2):
        assert request(url, "/api/stats", bearer(f"wrong-guess-{i}"))[0] == 401
    status, headers, _ = request(url, "/api/stats", bearer("wrong-guess-last"))
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert request(url, "/api/stats", bearer(TOKEN))[0] == 200  # the right token is never locked out
    server.stop()

    log = re.sub(r"\x1b\[[0-9;]*m", "", server.log())  # Werkzeug colours its lines
    assert '"GET /?token=[redacted]&view=1 HTTP/1.1" 303' in log
    assert '"GET /api/stats?token=[redacted] HTTP/1.1" 401' in log
    assert '"GET /api/stats?token=[redacted]&x=1 HTTP/1.1" 401' in log  # Werkzeug logs the path decoded
    assert '"GET /api/stats HTTP/1.1" 429' in log
    assert TOKEN not in log and TOKEN[1:] not in log and "wrong-guess-one" not in log
    assert "wrong-guess-two" not in log


@pytest.mark.skipif(not HAS_GUNICORN, reason="gunicorn is not installed")
def test_launcher_serves_with_gunicorn_and_its_access_log_never_shows_the_token(tmp_path):
    run = finished_run(tmp_path / "run")
    port = free_port()
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", LAUNCHER, "--logs", run.logs_dir, "--server", "gunicorn"],
                                env=launcher_env(DASHBOARD_TOKEN=TOKEN, DASHBOARD_PORT=str(port)),
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, TOKEN, log_path=str(log_path))
        assert request(url, "/api/stats")[0] == 401
        status, _, body = request(url, "/api/stats", bearer(TOKEN))
        assert status == 200 and json.loads(body)["status"] == "finished"
        assert request(url, f"/?token={TOKEN}&view=1")[0] == 303
        assert request(url, f"/api/stats?token={TOKEN}")[0] == 200
        assert request(url, "/api/series/loss?smoothing=0.5&token=wrong-guess-one")[0] == 401
        assert request(url, f"/api/stats?next=%2F%3Ftoken%3D{TOKEN}")[0] == 401  # encoded inside a parameter
        encoded = "%" + TOKEN[0].encode().hex() + TOKEN[1:]  # the name and part of the value percent-encoded
        assert request(url, f"/api/stats?tok%65n={encoded}")[0] == 200  # the app decodes them: it is the token
        assert request(url, "/api/stats?tok%65n=wrong-guess-two")[0] == 401
        assert request(url, "/api/stats", bearer(TOKEN), host=f"evil.example:{port}")[0] == 400
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    log = log_path.read_text()
    assert '"GET /?token=[redacted]&view=1 HTTP/1.1" 303' in log  # gunicorn's access-log format
    assert "smoothing=0.5&token=[redacted] HTTP/1.1\" 401" in log
    assert '"GET /api/stats?next=[redacted] HTTP/1.1" 401' in log  # its value decodes to one holding the token
    assert '"GET /api/stats?tok%65n=[redacted] HTTP/1.1" 200' in log  # gunicorn logs the raw request line
    assert TOKEN not in log and TOKEN[1:] not in log and "wrong-guess-one" not in log and "wrong-guess-two" not in log


# -- launch_dashboard.sh ------------------------------------------------------------


def test_launcher_is_clean_under_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", LAUNCHER], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_launcher_refusals_are_pythons_one_line(tmp_path):
    def refused(*args, **env) -> str:
        result = launch("--logs", str(tmp_path), *args, env=env)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
        return result.stderr

    assert "DASHBOARD_TOKEN" in refused("--host", "0.0.0.0")
    assert "at least 16" in refused("--host", "0.0.0.0", DASHBOARD_TOKEN="short-token")
    assert "--port" in refused("--port", "99999")
    assert "unknown argument" in refused("--bogus")
    missing = launch("--config", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
