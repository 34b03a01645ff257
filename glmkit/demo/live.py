"""`make demo`: the dashboard first, then the training run it shows, live.

    python -m glmkit.demo.live --config configs/tiny.yaml [--port 5000] [--exit-after-training]

1. `launch_dashboard.sh` starts on 127.0.0.1 in a session of its own (its access log goes to a file, so the
   console keeps the trainer's lines), and its URL is printed once it answers.
2. `launch_training.sh` trains in the foreground, exactly as a real run is launched.
3. When training ends the dashboard keeps serving the finished run until Ctrl-C (or stops at once with
   --exit-after-training, for scripts and tests).

Ctrl-C reaches the trainer as the terminal sends it (SIGINT to the foreground process group: the trainer saves a
checkpoint and stops, so `make demo` again resumes it); this process then stops the dashboard and exits 130. The
exit status is otherwise the trainer's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request

from glmkit.config.cli import add_config_arguments, config_from_args
from glmkit.config.schema import KIT_ROOT

HEALTH_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m glmkit.demo.live", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--port", type=int, default=5000, help="the dashboard's port on 127.0.0.1 (default 5000)")
    parser.add_argument("--exit-after-training", action="store_true",
                        help="stop the dashboard as soon as training ends instead of serving until Ctrl-C")
    return parser.parse_args(argv)


def start_dashboard(config: str, port: int, log_path: str) -> subprocess.Popen:
    """launch_dashboard.sh in a session of its own: the terminal's Ctrl-C is handled here, for both processes."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen([os.path.join(KIT_ROOT, "launch_dashboard.sh"), "--config", config, "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=KIT_ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_serving(url: str, dashboard: subprocess.Popen, log_path: str) -> str | None:
    """None once the dashboard answers /health; otherwise why it does not (it exited, or it never answered)."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if dashboard.poll() is not None:
            return f"the dashboard exited with status {dashboard.returncode}: {last_line(log_path)}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return None
        except OSError:
            time.sleep(0.25)
    return f"the dashboard did not answer {url} within {HEALTH_TIMEOUT_SECONDS:.0f} s (its log: {log_path})"


def last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(no output)"


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process's whole session (gunicorn and its workers), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)  # a bad config is one line per problem and exit 2, before anything starts
    url = f"http://127.0.0.1:{args.port}"
    log_path = os.path.join(cfg.paths.scratch_dir, "demo-dashboard.log")
    dashboard = start_dashboard(args.config, args.port, log_path)
    trainer = None
    try:
        problem = wait_until_serving(url, dashboard, log_path)
        if problem:
            print(f"make demo: {problem}; pick another port: make demo DASHBOARD_PORT=5050", file=sys.stderr)
            return 2
        print(f"[demo] dashboard: {url}  (open it now: the run appears as it trains; access log: {log_path})",
              flush=True)
        trainer = subprocess.Popen([os.path.join(KIT_ROOT, "launch_training.sh"), "--config", args.config],
                                   cwd=KIT_ROOT)
        status = trainer.wait()
        trainer = None
        if args.exit_after_training:
            return status
        print(f"[demo] training exited with status {status}; the dashboard still serves the run at {url}. "
              f"Ctrl-C stops it.", flush=True)
        dashboard.wait()
        return status
    except KeyboardInterrupt:
        if trainer is not None:  # the trainer got the terminal's SIGINT too: let it save its checkpoint and stop
            print("\n[demo] Ctrl-C: the trainer saves a checkpoint and stops (make demo resumes it)", flush=True)
            while True:
                try:
                    trainer.wait()
                    break
                except KeyboardInterrupt:
                    continue  # a second Ctrl-C must not abandon a checkpoint being written
        return EXIT_INTERRUPTED
    finally:
        stop(dashboard)


if __name__ == "__main__":
    sys.exit(main())
