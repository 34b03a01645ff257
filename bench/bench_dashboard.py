#!/usr/bin/env python3
"""Dashboard performance benchmark (a measurement, not a timed test).

Writes a training_log.jsonl of --lines records (default 1,000,000) plus
realistic eval/event/expert logs, starts the dashboard as a real server on
127.0.0.1 (gunicorn as launch_dashboard.sh runs it, or Flask's server), then:

  1. times the first /api/stats (parses the whole backlog)      target <= 3 s
  2. appends --rate lines/s in the background and times
     /api/stats (bounded loop)                             target p95 <= 50 ms
  3. times /api/series/<name> (raw and smoothed)           target p95 <= 100 ms
  4. reads the server's peak resident memory (VmHWM)       target <= 500 MB

    .venv/bin/python bench/bench_dashboard.py [--lines 1000000] [--out bench/results/dashboard.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"first_stats_s": 3.0, "stats_p95_ms": 50.0, "series_p95_ms": 100.0, "peak_rss_mb": 500.0}

# Floats are written with repr(), as json.dumps does in the trainer: up to 17
# significant digits, exponents for small learning rates.  Noise comes from a
# pool of pre-formatted values so that writing a million lines stays quick.
TRAIN_LINE = (
    '{{"step": {step}, "time": {time!r}, "loss": {loss!r}, "lr": {lr!r}, "grad_norm": {gn}, '
    '"epoch": {epoch!r}, "tokens": {tokens}, "tokens_per_sec": {tps}, "steps_per_sec": {sps}, '
    '"elapsed_seconds": {elapsed!r}, "eta_seconds": {eta!r}, "total_steps": {total}, "aux_loss": null, '
    '"gpu_mem_allocated": 61234567890, "gpu_mem_reserved": 70234567890, "gpu_mem_peak": 75234567890}}\n'
)
_POOL = 4096
_GRAD = [repr(0.5 + random.random()) for _ in range(_POOL)]
_TPS = [repr(32768 + 1000 * random.random()) for _ in range(_POOL)]
_SPS = [repr(0.5 - 0.01 * random.random()) for _ in range(_POOL)]
_NOISE = [0.05 * random.random() for _ in range(_POOL)]


def train_line(step: int, total: int, t0: float) -> str:
    i = (step * 2654435761) % _POOL  # cheap scramble instead of a random call per field
    return TRAIN_LINE.format(
        step=step, time=t0 + 2.0 * step + _NOISE[i], loss=1.2 + 2.0 * math.exp(-step / 50_000) + _NOISE[i - 1],
        lr=2e-4 * (0.5 + 0.5 * math.cos(math.pi * step / total)) * min(1.0, step / 2000), gn=_GRAD[i],
        epoch=step / total, tokens=step * 65536, tps=_TPS[i], sps=_SPS[i],
        elapsed=2.0 * step + _NOISE[i], eta=2.0 * (total - step), total=total,
    )


def write_logs(logs: Path, lines: int) -> float:
    """Seed the five logs; returns seconds spent.  The big file is written in batches."""
    started = time.perf_counter()
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.time() - 2.0 * lines
    total = lines * 2
    with open(logs / "training_log.jsonl", "w", encoding="utf-8") as fh:
        for first in range(1, lines + 1, 20_000):
            fh.write("".join(train_line(s, total, t0) for s in range(first, min(first + 20_000, lines + 1))))
    with open(logs / "eval_log.jsonl", "w", encoding="utf-8") as fh:
        for step in range(500, lines + 1, 500):
            val = 1.3 + 2.0 * math.exp(-step / 50_000)
            fh.write(json.dumps({"step": step, "time": t0 + 2.0 * step, "val_loss": val,
                                 "perplexity": math.exp(val), "val_tokens": 409600}) + "\n")
    with open(logs / "events_log.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": 0, "time": t0, "event": "run_start", "config": {}, "world_size": 8,
                             "effective_batch": 64, "tokens_per_step": 262144, "total_steps": total,
                             "model_audit": {}}) + "\n")
        for step in range(5000, lines + 1, 5000):
            fh.write(json.dumps({"step": step, "time": t0 + 2.0 * step, "event": "checkpoint_saved",
                                 "path": f"checkpoint-{step}", "val_loss": 1.5, "size_bytes": 1 << 28}) + "\n")
    with open(logs / "expert_usage_log.jsonl", "w", encoding="utf-8") as fh:
        for step in range(lines - 50 * 1000, lines + 1, 1000):
            layers = [{"layer": layer, "counts": [random.randint(800, 1200) for _ in range(128)],
                       "max_over_mean": 1.2, "entropy": 0.99, "dead_experts": []} for layer in range(1, 46)]
            fh.write(json.dumps({"step": step, "time": t0 + 2.0 * step, "interval_tokens": 262144,
                                 "num_experts": 128, "top_k": 8, "layers": layers}) + "\n")
    return time.perf_counter() - started


class Appender(threading.Thread):
    """Appends `rate` training lines per second, one flushed line at a time."""

    def __init__(self, path: Path, first_step: int, total: int, rate: float):
        super().__init__(daemon=True)
        self.path, self.step, self.total, self.rate = path, first_step, total, rate
        self.stop = threading.Event()
        self.written = 0

    def run(self) -> None:
        t0 = time.time() - 2.0 * self.step
        with open(self.path, "a", encoding="utf-8") as fh:
            start = time.perf_counter()
            while not self.stop.is_set():
                fh.write(train_line(self.step, self.total, t0))
                fh.flush()
                self.step += 1
                self.written += 1
                delay = start + self.written / self.rate - time.perf_counter()
                if delay > 0:
                    self.stop.wait(delay)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(kind: str, logs: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DASHBOARD_LOGS_DIR": str(logs),
           "DASHBOARD_OUTPUT_DIR": str(logs.parent)}
    env.pop("DASHBOARD_TOKEN", None)
    if kind == "gunicorn":
        cmd = [sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", "gthread", "--threads", "8",
               "--bind", f"127.0.0.1:{port}", "--timeout", "120", *_no_control_socket(),
               "training_dashboard:app_from_env()"]
    else:
        cmd = [sys.executable, "training_dashboard.py", "--logs", str(logs), "--port", str(port)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _no_control_socket() -> list[str]:
    """gunicorn >= 24 opens a per-user control socket; not wanted for a benchmark."""
    usage = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True).stdout
    return ["--no-control-socket"] if "--no-control-socket" in usage else []


class Client:
    """Keep-alive HTTP client that reconnects when the server closes."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def get(self, path: str) -> tuple[float, int, bytes]:
        for attempt in range(2):
            try:
                started = time.perf_counter()
                self.conn.request("GET", path)
                response = self.conn.getresponse()
                body = response.read()
                elapsed = time.perf_counter() - started
                if response.getheader("Connection", "").lower() == "close" or response.version == 10:
                    self.conn.close()
                return elapsed, response.status, body
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt:
                    raise
        raise RuntimeError("unreachable")


def wait_healthy(client: Client, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if client.get("/health")[1] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not start")


def server_pids(proc: subprocess.Popen) -> list[int]:
    """The server and its children (gunicorn's worker holds the data)."""
    pids = [proc.pid]
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the server processes, from /proc/<pid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MB from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def summarise(samples: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)]
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 2), "p95_ms": round(p95, 2),
            "max_ms": round(ms[-1], 2)}


def timed_loop(client: Client, paths: list[str], n: int, pause: float) -> dict:
    samples = []
    for i in range(n):
        elapsed, status, _ = client.get(paths[i % len(paths)])
        if status != 200:
            raise RuntimeError(f"{paths[i % len(paths)]} -> HTTP {status}")
        samples.append(elapsed)
        time.sleep(pause)  # a polling client, not a flood: lets the appender run
    return summarise(samples)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=100.0, help="appended lines per second")
    parser.add_argument("--requests", type=int, default=300, help="requests per timed loop")
    parser.add_argument("--server", choices=("gunicorn", "flask"),
                        default="gunicorn" if shutil.which("gunicorn") or _has_gunicorn() else "flask")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dashboard.json"),
                        help="write the results as JSON here (default: bench/results/dashboard.json)")
    parser.add_argument("--workdir", help="keep the generated logs here (default: a temp folder, removed)")
    args = parser.parse_args()

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    logs = workdir / "run" / "logs"
    results: dict = {"lines": args.lines, "append_rate": args.rate, "server": args.server,
                     "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()}}
    proc = None
    appender = None
    try:
        random.seed(0)
        results["generate_s"] = round(write_logs(logs, args.lines), 2)
        results["log_mb"] = round((logs / "training_log.jsonl").stat().st_size / 2**20, 1)
        print(f"wrote {args.lines:,} lines ({results['log_mb']} MB) in {results['generate_s']} s", flush=True)

        port = free_port()
        proc = start_server(args.server, logs, port)
        client = Client(port)
        wait_healthy(client, proc)

        results["load_average_before"] = round(os.getloadavg()[0], 2)
        cpu_before = cpu_seconds(server_pids(proc))
        elapsed, status, body = client.get("/api/stats")
        assert status == 200 and json.loads(body)["step"] == args.lines, body[:200]
        results["first_stats_s"] = round(elapsed, 3)
        # Wall time depends on what else the machine runs; the server's CPU time does not.
        results["first_stats_server_cpu_s"] = round(cpu_seconds(server_pids(proc)) - cpu_before, 2)

        appender = Appender(logs / "training_log.jsonl", args.lines + 1, args.lines * 2, args.rate)
        appender.start()
        time.sleep(1.0)
        results["stats"] = timed_loop(client, ["/api/stats"], args.requests, 0.02)
        results["series"] = timed_loop(client, ["/api/series/loss", "/api/series/lr", "/api/series/grad_norm",
                                                "/api/series/tokens_per_sec"], args.requests, 0.02)
        results["series_smoothed"] = timed_loop(client, ["/api/series/loss?smoothing=0.9"], args.requests // 2, 0.02)
        results["series_eval"] = timed_loop(client, ["/api/series/val_loss"], args.requests // 3, 0.02)
        results["plot_png"] = timed_loop(client, ["/api/plots/loss.png"], 10, 0.3)
        final = json.loads(client.get("/api/stats")[2])
        results["appended_lines"] = appender.written
        results["last_step_seen"] = final["step"]
        rss = [memory_mb(pid) for pid in server_pids(proc)]
        results["rss_mb"] = round(max(r[0] for r in rss), 1)
        results["peak_rss_mb"] = round(max(r[1] for r in rss), 1)
    finally:
        if appender:
            appender.stop.set()
            appender.join()
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    results["pass"] = {
        "first_stats_s": results["first_stats_s"] <= TARGETS["first_stats_s"],
        "stats_p95_ms": results["stats"]["p95_ms"] <= TARGETS["stats_p95_ms"],
        "series_p95_ms": max(results["series"]["p95_ms"], results["series_smoothed"]["p95_ms"])
        <= TARGETS["series_p95_ms"],
        "peak_rss_mb": results["peak_rss_mb"] <= TARGETS["peak_rss_mb"],
    }
    print_table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0


def _has_gunicorn() -> bool:
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(r: dict) -> None:
    m = r["machine"]
    print(f"\n{r['lines']:,}-line training log ({r['log_mb']} MB), {r['server']}, "
          f"{m['cpus']} CPUs ({m['cpu']}), load average {r['load_average_before']}, "
          f"appending {r['append_rate']:.0f} lines/s")
    def timing(key: str, target: str, ok) -> tuple:
        t = r[key]
        return t["median_ms"], t["p95_ms"], t["max_ms"], target, ok

    series_ok = max(r["series"]["p95_ms"], r["series_smoothed"]["p95_ms"]) <= TARGETS["series_p95_ms"]
    rows = [
        ("first /api/stats (ms)", f"{r['first_stats_s'] * 1000:.0f}", "", "", "<= 3000", r["pass"]["first_stats_s"]),
        ("  server CPU for it (ms)", f"{r['first_stats_server_cpu_s'] * 1000:.0f}", "", "", "", ""),
        ("/api/stats, live (ms)", *timing("stats", "p95 <= 50", r["pass"]["stats_p95_ms"])),
        ("/api/series, 4 train series (ms)", *timing("series", "p95 <= 100", series_ok)),
        ("/api/series/loss?smoothing=0.9", *timing("series_smoothed", "p95 <= 100", series_ok)),
        ("/api/series/val_loss (ms)", *timing("series_eval", "", "")),
        ("/api/plots/loss.png, redraw (ms)", *timing("plot_png", "", "")),
        ("peak RSS (MB)", r["peak_rss_mb"], "", "", "<= 500", r["pass"]["peak_rss_mb"]),
    ]
    print(f"{'measure':34} {'median':>8} {'p95':>8} {'max':>8}  {'target':11} ok")
    for name, median, p95, worst, target, ok in rows:
        mark = "" if ok == "" else ("yes" if ok else "NO")
        print(f"{name:34} {median!s:>8} {p95!s:>8} {worst!s:>8}  {target:11} {mark}")
    print("(values other than `step` are parsed on first use: the first /api/series of a column is the 'max')")
    print(f"appended {r['appended_lines']} lines during the loops; last step seen {r['last_step_seen']:,}")


if __name__ == "__main__":
    sys.exit(main())
