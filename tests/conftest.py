"""Shared fixtures and helpers: the tiny GLM-4.5-Air checkpoint and the demo corpus (built once per session,
however many pytest-xdist workers run), configs, running the kit's commands (`run_cli`), free ports, and the
dashboard served for real and driven by headless Chromium. Fakes (a fake run's logs) are in fakes.py, the fake
Hub in fake_hub.py.

`make test` runs the suite in two xdist workers. Expensive artifacts that many tests read (the tiny model, the
corpus, a finished training run) are built once for the whole session with `shared_folder`: the first worker
to ask builds it under a file lock, the others wait for it and read the same folder."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")

# Two workers on two cores: one math thread each (the tests' subprocesses inherit it), or they fight over cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---------------------------------------------------------------------------
# Order: the slowest tests first, so that neither worker ends the session alone on a long one
# ---------------------------------------------------------------------------

# Seconds per test (setup + call + teardown) from an earlier run; `make durations` rewrites it. A stale or
# missing file costs only speed: unknown tests go last, in collection order.
DURATIONS_FILE = os.path.join(ROOT, "tests", "durations.json")
RECORD_DURATIONS = os.environ.get("GLMKIT_RECORD_DURATIONS")  # a path: write this session's seconds there
_seconds: dict[str, float] = {}


def pytest_collection_modifyitems(config, items):
    try:
        with open(DURATIONS_FILE, encoding="utf-8") as fh:
            known = json.load(fh)
    except (OSError, ValueError):
        return
    # Whole files, the longest (in summed seconds) first: `make test` hands files to the two workers in this
    # order (--dist loadfile --no-loadscope-reorder), which is largest-first scheduling by file. A file's
    # tests stay together and in their order, so its module-scoped runs are built once: sorting single tests
    # across files made pytest tear those down and rebuild them (27% more CPU time, measured).
    totals: dict[str, float] = {}
    for item in items:
        totals[item.location[0]] = totals.get(item.location[0], 0.0) + float(known.get(item.nodeid, 0.0))
    items.sort(key=lambda item: -totals[item.location[0]])  # stable: in-file order kept


# ---------------------------------------------------------------------------
# Tiers: `make test-fast` runs every test that starts no training process (-m "not trains")
# ---------------------------------------------------------------------------

# A test (or a fixture it uses) that starts a training process is marked `@pytest.mark.trains` (or its module
# `pytestmark`). The mark is checked, not trusted: while a test without it is set up, run or torn down, starting a
# trainer fails that test, naming the mark it needs. Only the command is read, never what it does.
NOT_TRAINING = {"--plan", "--prepare-data", "--inspect-data", "--help", "-h", "--dry-run"}
_current_test = None


def starts_training(args) -> bool:
    """Does this command line start a trainer (train_qlora.py, the launcher, the GPU smoke test's CPU run)?"""
    words = args.split() if isinstance(args, str) else [os.fspath(a) for a in args]
    if any(flag in words or any(w.startswith(flag + "=") for w in words) for flag in NOT_TRAINING):
        return False
    scripts = ("train_qlora.py", "launch_training.sh", "gpu_smoke.sh")
    return any(w.endswith(scripts) for w in words) or any("train_qlora.main(" in w for w in words)


_popen_init = subprocess.Popen.__init__


def _checked_popen_init(self, args, *rest, **kwargs):
    item = _current_test
    if item is not None and item.get_closest_marker("trains") is None and starts_training(args):
        pytest.fail(f"{item.nodeid} starts a training process ({args!r}) but is not marked "
                                f"@pytest.mark.trains, so `make test-fast` would run it: mark the test (or its module)")
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _checked_popen_init


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _current_test
    _current_test = item
    try:
        return (yield)
    finally:
        _current_test = None


def pytest_runtest_logreport(report):
    if RECORD_DURATIONS:
        _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    if RECORD_DURATIONS and not hasattr(session.config, "workerinput"):  # the controller sees every report
        with open(RECORD_DURATIONS, "w", encoding="utf-8") as fh:
            json.dump({k: round(v, 2) for k, v in sorted(_seconds.items())}, fh, indent=0)


def shared_folder(tmp_path_factory, name: str, build) -> pathlib.Path:
    """A folder that `build(folder)` fills once per test session, shared by every xdist worker.

    The first caller builds it while holding a lock; callers in other workers block on the lock, then find
    it built. A build that fails leaves no `shared-<name>.built` marker, so the next caller tries again (and fails the
    same way, in its own test). Readers must not change what is inside: copy it first.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder, built = base / f"shared-{name}", base / f"shared-{name}.built"  # the marker outside: tests list the folder
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


# Both are built in a fresh process, as `download_model.py --tiny` and `python -m glmkit.demo.corpus` do. Both come
# from inputs the repository fixes (the frozen corpus, seeded weights); PINNED_INPUTS holds their hashes.

def write_tiny_model_in_fresh_process(path: str, env: dict | None = None) -> None:
    code = f"from glmkit.demo.tiny import write_tiny_checkpoint; write_tiny_checkpoint({path!r}, seed=0)"
    result = run_cli(["-c", code], env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def write_demo_corpus_in_fresh_process(path: str, max_docs: int, env: dict | None = None) -> None:
    code = f"from glmkit.demo.corpus import write_demo_corpus; write_demo_corpus({path!r}, max_docs={max_docs})"
    result = run_cli(["-c", code], env=env)
    assert result.returncode == 0, result.stderr[-2000:]


# What every number the suite pins (tests/test_train.py, tests/test_eval_sets.py) is computed from: the demo corpus
# the tests train on (its first 400 documents), the tiny model's tokenizer and its weights, by sha256. They depend
# only on the repository (the frozen corpus, a seeded init; torch's vectorised normal_ on any AVX2 or newer CPU), so
# a machine that builds other inputs is told which one differs before any loss is compared.
PINNED_INPUTS = {
    "the demo corpus (400 documents)": "64078ff2a591c142fae907b7e37efdd1819812c9c2a87516f80bab5baf9e1f66",
    "the tiny model's tokenizer.json": "c435865d2be52d0ad108580b70f1af175242b9ea2e9edff3d983c1d9752a8b74",
    "the tiny model's weights (every *.safetensors shard)": "5bdfb4bf569b68104a9b4d191668635874ad691cf944686f99e0d9297fafd756",
}


def pinned_input_hashes(model_dir: str, corpus: str) -> dict[str, str]:
    """The sha256 of each input PINNED_INPUTS names, as built here (`cat FILES | sha256sum` gives the same)."""
    import hashlib

    def digest(paths) -> str:
        h = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        return h.hexdigest()

    shards = sorted(os.path.join(model_dir, n) for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    return dict(zip(PINNED_INPUTS, (digest([corpus]), digest([os.path.join(model_dir, "tokenizer.json")]),
                                    digest(shards))))


def assert_pinned_inputs(model_dir: str, corpus: str) -> None:
    """Fail naming the input, if one differs from what the pinned numbers were computed from."""
    differ = [f"{name}: sha256 {found[:16]}..., the pins were computed from {PINNED_INPUTS[name][:16]}..."
              for name, found in pinned_input_hashes(model_dir, corpus).items() if found != PINNED_INPUTS[name]]
    assert not differ, "inputs of the pinned numbers differ on this machine: " + "; ".join(differ)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return str(shared_folder(tmp_path_factory, "tiny-model", lambda folder: write_tiny_model_in_fresh_process(str(folder))))


def write_tiny_variant_in_fresh_process(path: str, variant: str, tokenizer_from: str) -> None:
    """`download_model.py --tiny VARIANT`'s checkpoint, the tokenizer reused from `tokenizer_from` (no BPE training)."""
    code = (f"from glmkit.demo.tiny import write_tiny_checkpoint; write_tiny_checkpoint({path!r}, seed=0, "
            f"variant={variant!r}, tokenizer_from={tokenizer_from!r})")
    result = run_cli(["-c", code])
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="session")
def tiny_flash_dir(tmp_path_factory, tiny_model_dir):
    """The tiny GLM-4.7-Flash (glm4_moe_lite: MLA attention, q/k head dim = v head dim as in the real model)."""
    return str(shared_folder(tmp_path_factory, "tiny-flash", lambda folder: write_tiny_variant_in_fresh_process(
        str(folder), "glm4.7-flash", tiny_model_dir)))


@pytest.fixture(scope="session")
def tiny_flash_narrow_v_dir(tmp_path_factory, tiny_model_dir):
    """The tiny GLM-4.7-Flash with v head dim 16 against q/k's 32 (DeepSeek-V3's shape of MLA)."""
    return str(shared_folder(tmp_path_factory, "tiny-flash-narrow-v", lambda folder: write_tiny_variant_in_fresh_process(
        str(folder), "glm4.7-flash-narrow-v", tiny_model_dir)))


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    folder = shared_folder(tmp_path_factory, "data",
                           lambda folder: write_demo_corpus_in_fresh_process(str(folder / "demo.jsonl"), max_docs=400))
    return str(folder / "demo.jsonl")


@dataclass
class FinishedRun:
    """A training run that ended with exit 0: its config, folders and console output."""
    config: str
    out: str
    best: str
    stdout: str
    folder: pathlib.Path
    stderr: str = ""

    def __getitem__(self, key):  # the tests read runs as dicts
        return getattr(self, key)


def shared_training_run(tmp_path_factory, name: str, model_dir: str, data_path, overrides: dict,
                        launch: tuple[str, ...] = (), env: dict | None = None) -> FinishedRun:
    """`train_qlora.py` on a tiny config with `overrides`, run once per session and read by many tests."""

    def train(folder):
        config = write_tiny_config(folder, model_dir, data_path, overrides)
        result = run_cli([*launch, "train_qlora.py", "--config", config], env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        (folder / "stdout.txt").write_text(result.stdout)
        (folder / "stderr.txt").write_text(result.stderr)

    folder = shared_folder(tmp_path_factory, name, train)
    return FinishedRun(str(folder / "config.yaml"), str(folder / "run"), str(folder / "best"),
                       (folder / "stdout.txt").read_text(), folder, (folder / "stderr.txt").read_text())


# One short expert-LoRA training run (attention r 8 and routed experts r 4 on the tiny model), shared by the
# expert-LoRA, merge and serving-export tests of a session.
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXPERT_R = 4
EXPERT_LORA_SETTINGS = {"lora.dropout": 0.0, "lora.target_parameters": EXPERTS, "lora.expert_r": EXPERT_R,
                        "lora.expert_alpha": 8, "training.max_steps": 8, "logging.eval_interval": 2,
                        "checkpoint.interval": 4, "checkpoint.keep_top_k": 1,
                        "logging.expert_stats_interval": 3}


@pytest.fixture(scope="session")
def expert_run(tmp_path_factory, tiny_model_dir, demo_corpus):
    """`train_qlora.py` with EXPERT_LORA_SETTINGS, run once per session (the expert-LoRA, merge and export tests)."""
    return shared_training_run(tmp_path_factory, "expert-lora", tiny_model_dir, demo_corpus, EXPERT_LORA_SETTINGS)


def model_with_random_adapter(folder, model_dir: str, data_path: str, overrides: dict | None = None):
    """(the kit's 4-bit model with LoRA, prepared for training, its config) for configs/tiny.yaml with `overrides`,
    every trainable weight drawn from one seeded generator (lora_B too, so every LoRA matrix gets a gradient):
    the same adapter whatever the attention implementation or loss being compared."""
    import torch

    from glmkit.config.load import load_config
    from glmkit.model import load as modeling

    cfg = load_config(write_tiny_config(folder, model_dir, data_path, overrides))
    model = modeling.prepare_for_training(modeling.load_model(cfg), cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model, cfg


def write_tiny_config(folder, model_dir: str, data_path: str, overrides: dict | None = None,
                      name: str = "config.yaml") -> str:
    """configs/tiny.yaml with paths inside `folder` and {"section.key": value} overrides; return its path."""
    with open(TINY_CONFIG, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    data["paths"].update(model_dir=model_dir, data_path=data_path, output_dir=str(folder / "run"),
                         best_adapter_dir=str(folder / "best"), scratch_dir=str(folder / "scratch"))
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        data[section][key] = value
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, demo_corpus):
    """Write a tiny config into tmp_path with overrides {"section.key": value}; return its path."""

    def make(overrides: dict | None = None, name: str = "config.yaml") -> str:
        return write_tiny_config(tmp_path, tiny_model_dir, demo_corpus, overrides, name)

    return make


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600, cwd: str = ROOT,
            unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `python <args>` as a user would: from the repo root (or `cwd`), with this environment minus the
    variables whose names start with one of `unset`, plus `env`."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(unset)}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------
# The dashboard, served for real and seen in a real browser
# ---------------------------------------------------------------------------

CHROMIUM = os.environ.get("DASHBOARD_TEST_CHROMIUM", "/usr/bin/chromium")
# The test machine has no network: without these chromium keeps trying to reach Google.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class DashboardServer:
    url: str
    port: int
    log_path: str  # the server's stderr: Werkzeug's access log
    process: subprocess.Popen

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_until_healthy(url: str, process: subprocess.Popen, token: str | None = None, timeout: float = 30.0,
                       log_path: str | None = None) -> None:
    request = urllib.request.Request(url + "/health")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = ""
            if log_path:
                with open(log_path, encoding="utf-8", errors="replace") as fh:
                    tail = fh.read()[-2000:]
            raise RuntimeError(f"dashboard exited with {process.returncode}: {tail}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("dashboard did not become healthy in time")


@pytest.fixture
def serve_dashboard(tmp_path_factory):
    """serve_dashboard(logs_dir, output_dir=None, token=None, extra_args=()) -> DashboardServer: the real
    `training_dashboard.py` server on 127.0.0.1 and a free port (refresh 1 s), stopped after the test."""
    servers = []

    def serve(logs_dir, output_dir=None, token: str | None = None, extra_args=()) -> DashboardServer:
        port = free_port()
        cmd = [sys.executable, os.path.join(ROOT, "training_dashboard.py"), "--logs", str(logs_dir),
               "--host", "127.0.0.1", "--port", str(port), "--refresh", "1", *extra_args]
        if output_dir:
            cmd += ["--output-dir", str(output_dir)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DASHBOARD_")}
        if token:
            env["DASHBOARD_TOKEN"] = token
        log_path = str(tmp_path_factory.mktemp("dashboard-server") / "server.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        server = DashboardServer(f"http://127.0.0.1:{port}", port, log_path, process)
        servers.append(server)
        wait_until_healthy(server.url, process, token, log_path=log_path)
        return server

    yield serve
    for server in servers:
        server.stop()


@pytest.fixture
def chromium():
    """chromium(width=1440, height=1000) -> a Playwright page in headless Debian chromium (never a downloaded
    browser), started on first use and closed after the test. Skips without Playwright or chromium."""
    playwright_sync = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    opened = []

    def new_page(width: int = 1440, height: int = 1000):
        if not opened:
            pw = playwright_sync.sync_playwright().start()
            opened.append(pw)
            opened.append(pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS))
        return opened[1].new_page(viewport={"width": width, "height": height})

    yield new_page
    if opened:
        opened[1].close()
        opened[0].stop()


def wait_for_plots(page, timeout_ms: int = 30_000) -> None:
    """Until every plot image on the dashboard page has loaded."""
    page.wait_for_function(
        """() => [...document.querySelectorAll('img[data-plot]')]
                 .every(img => img.getAttribute('src') && img.complete && img.naturalWidth > 0)""",
        timeout=timeout_ms,
    )


def jsonl_bytes(lines) -> bytes:
    """JSONL of {"text": x} per str item; {"raw": line} items go in verbatim."""
    return "".join((json.dumps({"text": x}) if isinstance(x, str) else x["raw"]) + "\n" for x in lines).encode()


def write_shard(path, texts) -> str:
    """texts as a shard in the format its name says; {"raw": line} items go in verbatim (JSONL formats)."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path, row_group_size=50)
    elif path.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(jsonl_bytes(texts))
    elif path.endswith(".zst"):
        import zstandard

        with open(path, "wb") as fh:
            fh.write(zstandard.ZstdCompressor(write_checksum=True).compress(jsonl_bytes(texts)))
    else:
        with open(path, "wb") as fh:
            fh.write(jsonl_bytes(texts))
    return path
