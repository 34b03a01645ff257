"""download_model.py against a fake Hub on 127.0.0.1 (tests/fake_hub.py); never contacts huggingface.co.

The CLI runs in a subprocess wherever the exit code, the one-line errors or the absence of a traceback
matter, with HF_ENDPOINT pointing at the fake hub, a private HF_HOME and xet disabled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import types

import pytest
from conftest import ROOT, free_port, run_cli
from fake_hub import FakeHub

from glmkit.hub import download as hubmod
from glmkit.hub import verify as model_files

REPO_ID = "glmkit-test/GLM-4.5-Air-tiny"
SCRIPT = os.path.join(ROOT, "download_model.py")
TOKEN = "hf_secret_test_token"


# ---------------------------------------------------------------------------
# The repo the fake hub serves: real config, dummy tokenizer, real safetensors shards + index
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def repo_files(tmp_path_factory) -> dict[str, bytes]:
    import torch
    from huggingface_hub import constants
    from safetensors.torch import save_file
    from transformers import Glm4MoeConfig

    # The embedding shard is a bit over one huggingface_hub download chunk: bytes received are only
    # written (and so only resumable with a Range request) a whole chunk at a time.
    hidden = 32
    vocab = (constants.DOWNLOAD_CHUNK_SIZE * 6 // 5) // (hidden * 4)
    config = Glm4MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                           num_nextn_predict_layers=0,  # its weights hold no MTP layer (verify checks they agree)
                           architectures=["Glm4MoeForCausalLM"])
    torch.manual_seed(0)
    shard_tensors = [
        {"model.embed_tokens.weight": torch.randn(vocab, hidden)},
        {"model.layers.0.self_attn.q_proj.weight": torch.randn(32, hidden),
         "model.layers.0.mlp.gate_proj.weight": torch.randn(64, hidden)},
        {"model.layers.1.mlp.experts.0.up_proj.weight": torch.randn(16, hidden),
         "model.layers.1.mlp.gate.weight": torch.randn(4, hidden),
         "model.norm.weight": torch.randn(hidden)},
    ]
    folder = tmp_path_factory.mktemp("repo")
    files, weight_map = {}, {}
    for i, tensors in enumerate(shard_tensors, start=1):
        name = f"model-{i:05d}-of-{len(shard_tensors):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        files[name] = (folder / name).read_bytes()
        weight_map.update({tensor: name for tensor in tensors})
    total = sum(t.numel() * t.element_size() for tensors in shard_tensors for t in tensors.values())
    files[hubmod.INDEX_FILE] = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}).encode()
    files["config.json"] = config.to_json_string().encode()
    files["tokenizer.json"] = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}).encode()
    files["tokenizer_config.json"] = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}).encode()
    files["README.md"] = b"# tiny GLM-4.5 MoE test repo\n"
    return files


@pytest.fixture
def fake_hub(repo_files):
    with FakeHub(REPO_ID, repo_files) as server:
        yield server


def biggest_shard(files: dict[str, bytes]) -> str:
    return max((n for n in files if n.endswith(".safetensors")), key=lambda n: len(files[n]))


def shards(files: dict[str, bytes]) -> list[str]:
    return sorted(n for n in files if n.endswith(".safetensors"))


# ---------------------------------------------------------------------------
# Running the CLI
# ---------------------------------------------------------------------------

def write_config(tmp_path, model_dir, repo_id=REPO_ID, revision="main") -> str:
    path = tmp_path / "training_config.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": repo_id, "revision": revision},
                                "paths": {"model_dir": str(model_dir)}}))  # JSON is YAML
    return str(path)


# The user's own Hub settings and proxies must not reach the fake hub.
HUB_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE", "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY",
           "HTTPS_PROXY", "ALL_PROXY")


def run_download(tmp_path, *args, endpoint, model_dir=None, repo_id=REPO_ID, revision="main", timeout=120,
                 **env_extra):
    model_dir = model_dir or tmp_path / "model"
    env = dict(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", **env_extra)
    config = write_config(tmp_path, model_dir, repo_id, revision)
    return run_cli([SCRIPT, "--config", config, *args], env=env, timeout=timeout, cwd=str(tmp_path), unset=HUB_ENV)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_clean_failure(result, *expected):
    """Non-zero exit, exactly one `error:` line containing every expected fragment, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = error_lines(result)
    assert len(lines) == 1, output
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_repo(folder, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


@contextlib.contextmanager
def silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection, reads nothing and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted, stop = [], threading.Event()

    def accept_forever():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was closed
                return
            accepted.append(conn)  # hold it open, silently

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        listener.close()
        for conn in accepted:
            conn.close()
        thread.join(timeout=5)


def flip_bit(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def data_start(data: bytes) -> int:
    """Where a safetensors file's tensor data begins (after the 8-byte length and the JSON header)."""
    return 8 + int.from_bytes(data[:8], "little")


# ---------------------------------------------------------------------------
# (1) full download, then verification
# ---------------------------------------------------------------------------

def test_full_download_then_verification_passes(tmp_path, fake_hub, repo_files):
    result = run_download(tmp_path, endpoint=fake_hub.endpoint)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified:" in result.stdout and "footprint:" in result.stdout
    for name, data in repo_files.items():
        assert (tmp_path / "model" / name).read_bytes() == data, name
    assert {s.file for s in fake_hub.downloads()} == set(repo_files)
    assert fake_hub.commit[:12] in result.stdout  # the branch was pinned to the commit it pointed at


# ---------------------------------------------------------------------------
# (2) a transfer cut off midway
# ---------------------------------------------------------------------------

def test_dropped_connection_is_resumed_with_a_range_request(tmp_path, fake_hub, repo_files):
    shard = biggest_shard(repo_files)
    cut = len(repo_files[shard]) * 9 // 10
    fake_hub.drop_connection(shard, after_bytes=cut, times=1)

    result = run_download(tmp_path, endpoint=fake_hub.endpoint)

    assert result.returncode == 0, result.stdout + result.stderr
    first, retry = fake_hub.downloads(shard)
    assert first.range is None
    start = int(retry.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= cut  # continued from what had reached the disk, not from zero
    assert (tmp_path / "model" / shard).read_bytes() == repo_files[shard]


def test_interrupted_download_fails_in_one_line_and_rerun_completes(tmp_path, fake_hub, repo_files):
    shard = biggest_shard(repo_files)
    # Cut the shard, then answer 503 to the in-run retry: the first run has to give up.
    fake_hub.drop_connection(shard, after_bytes=len(repo_files[shard]) * 9 // 10, times=1, then_status=503)

    first = run_download(tmp_path, endpoint=fake_hub.endpoint)

    assert_clean_failure(first, "503", "rerun download_model.py")
    assert [s.range is not None for s in fake_hub.downloads(shard)] == [False, True]  # it tried to resume
    model_dir = tmp_path / "model"
    assert not (model_dir / shard).exists()
    still_missing = {name for name in repo_files if not (model_dir / name).exists()}
    fake_hub.restore()
    fake_hub.clear_log()

    second = run_download(tmp_path, endpoint=fake_hub.endpoint)

    assert second.returncode == 0, second.stdout + second.stderr
    assert "verified:" in second.stdout
    # The rerun fetched only what the first run had not finished.
    assert {s.file for s in fake_hub.downloads()} == still_missing
    assert (model_dir / shard).read_bytes() == repo_files[shard]


def test_rerun_refetches_a_shard_truncated_after_download(tmp_path, fake_hub, repo_files):
    assert run_download(tmp_path, endpoint=fake_hub.endpoint).returncode == 0
    shard = shards(repo_files)[-1]
    path = tmp_path / "model" / shard
    path.write_bytes(repo_files[shard][: len(repo_files[shard]) // 2])
    fake_hub.clear_log()

    result = run_download(tmp_path, endpoint=fake_hub.endpoint)

    assert result.returncode == 0, result.stdout + result.stderr
    assert {s.file for s in fake_hub.downloads()} == {shard}
    assert path.read_bytes() == repo_files[shard]


# ---------------------------------------------------------------------------
# (3) verification catches a missing and a truncated shard
# ---------------------------------------------------------------------------

def test_verify_only_catches_missing_and_truncated_shards(tmp_path, repo_files):
    model_dir = tmp_path / "model"
    write_repo(model_dir, repo_files)
    missing, truncated = shards(repo_files)[:2]
    (model_dir / missing).unlink()
    (model_dir / truncated).write_bytes(repo_files[truncated][:-100])

    result = run_download(tmp_path, "--verify-only", endpoint=f"http://127.0.0.1:{free_port()}")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 2, result.stderr
    assert missing in lines[0] and "missing" in lines[0] and "rerun download_model.py" in lines[0]
    assert truncated in lines[1] and "truncated" in lines[1] and "rerun download_model.py" in lines[1]


def test_verify_only_passes_on_a_complete_folder(tmp_path, repo_files):
    write_repo(tmp_path / "model", repo_files)

    result = run_download(tmp_path, "--verify-only", endpoint=f"http://127.0.0.1:{free_port()}")

    assert result.returncode == 0, result.stdout + result.stderr
    size = sum(len(d) for d in repo_files.values()) / hubmod.GB
    assert f"footprint: {size:.2f} GB" in result.stdout


def test_verification_checks_config_tokenizer_and_index(tmp_path, repo_files):
    model_dir = tmp_path / "model"
    write_repo(model_dir, repo_files)
    config = json.loads(repo_files["config.json"])
    (model_dir / "config.json").write_text(json.dumps(dict(config, architectures=["LlamaForCausalLM"],
                                                           model_type="llama")))
    (model_dir / "tokenizer.json").unlink()
    (model_dir / hubmod.INDEX_FILE).unlink()

    problems = model_files.verify_model_dir(str(model_dir))

    assert len(problems) == 3, problems
    assert "config.json" in problems[0] and "LlamaForCausalLM" in problems[0]
    assert "tokenizer.json" in problems[1] and "missing" in problems[1]
    assert hubmod.INDEX_FILE in problems[2] and "missing" in problems[2]


def test_safetensors_check_reads_only_the_header(tmp_path, repo_files):
    shard = biggest_shard(repo_files)
    path = tmp_path / shard
    path.write_bytes(repo_files[shard])
    assert model_files.check_safetensors_file(str(path), ["model.embed_tokens.weight"]) is None
    assert "lacks 1 tensor" in model_files.check_safetensors_file(str(path), ["model.norm.weight"])
    path.write_bytes(repo_files[shard] + b"\0")
    assert "accounts for only" in model_files.check_safetensors_file(str(path))
    path.write_bytes(repo_files[shard][:20])
    assert "truncated" in model_files.check_safetensors_file(str(path))
    path.write_bytes(b"")
    assert "empty" in model_files.check_safetensors_file(str(path))


def test_verify_only_fails_on_a_shard_overwritten_with_random_bytes(tmp_path, repo_files):
    model_dir = tmp_path / "model"
    write_repo(model_dir, repo_files)
    shard = shards(repo_files)[1]
    (model_dir / shard).write_bytes(os.urandom(len(repo_files[shard])))  # same size, nothing else right

    result = run_download(tmp_path, "--verify-only", endpoint=f"http://127.0.0.1:{free_port()}")

    assert result.returncode == 1
    assert_clean_failure(result, shard, "not a safetensors file", "rerun download_model.py")


def test_verify_only_fails_when_a_header_no_longer_matches_the_data(tmp_path, repo_files):
    """A header edited to another shape, same byte count of JSON: each tensor's dtype x shape must be its range."""
    model_dir = tmp_path / "model"
    write_repo(model_dir, repo_files)
    shard = shards(repo_files)[1]
    data = repo_files[shard]
    end = data_start(data)
    header = data[8:end].replace(b'"shape":[64,32]', b'"shape":[32,32]')
    assert header != data[8:end] and len(header) == end - 8
    (model_dir / shard).write_bytes(data[:8] + header + data[end:])

    result = run_download(tmp_path, "--verify-only", endpoint=f"http://127.0.0.1:{free_port()}")

    assert result.returncode == 1
    assert_clean_failure(result, shard, "model.layers.0.mlp.gate_proj.weight", "needs 4096 bytes", "span 8192")


def test_deep_catches_a_flipped_bit_inside_tensor_data_and_passes_when_clean(tmp_path, fake_hub, repo_files):
    assert run_download(tmp_path, endpoint=fake_hub.endpoint).returncode == 0  # a real download: records the commit
    model_dir = tmp_path / "model"

    clean = run_download(tmp_path, "--verify-only", "--deep", endpoint=fake_hub.endpoint)

    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "every file's hash matches the Hub's" in clean.stdout
    assert f"against {REPO_ID} @ {fake_hub.commit[:12]}" in clean.stdout

    shard = biggest_shard(repo_files)
    flip_bit(model_dir / shard, data_start(repo_files[shard]) + 1000)
    shallow = run_download(tmp_path, "--verify-only", endpoint=fake_hub.endpoint)
    assert shallow.returncode == 0, shallow.stderr  # the header can't see it: only a hash can

    deep = run_download(tmp_path, "--verify-only", "--deep", endpoint=fake_hub.endpoint)

    line = assert_clean_failure(deep, shard, "differs from the Hub's", "sha256",
                                hashlib.sha256(repo_files[shard]).hexdigest()[:12], "rerun download_model.py")
    assert str(model_dir / shard) in line
    assert (model_dir / shard).exists()  # reported, never deleted by a check


def test_deep_also_checks_small_files_by_their_git_blob_id(tmp_path, fake_hub):
    assert run_download(tmp_path, endpoint=fake_hub.endpoint).returncode == 0
    readme = tmp_path / "model" / "README.md"
    readme.write_text("# edited locally\n")

    result = run_download(tmp_path, "--verify-only", "--deep", endpoint=fake_hub.endpoint)

    assert_clean_failure(result, "README.md", "git-sha1", "differs from the Hub's")


def test_deep_without_the_hub_is_one_line(tmp_path, repo_files):
    write_repo(tmp_path / "model", repo_files)

    result = run_download(tmp_path, "--verify-only", "--deep", endpoint=f"http://127.0.0.1:{free_port()}")

    assert_clean_failure(result, "--deep needs the Hub's file hashes", "cannot reach")


# ---------------------------------------------------------------------------
# (4) gated repo, token handling, and the other Hub errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("token", [TOKEN, None], ids=["token-without-access", "no-token"])
def test_gated_repo_gives_one_line_and_never_prints_the_token(tmp_path, repo_files, token):
    env = {"HF_TOKEN": token} if token else {}
    with FakeHub(REPO_ID, repo_files, gated=True) as gated:
        result = run_download(tmp_path, endpoint=gated.endpoint, **env)

    line = assert_clean_failure(result, "gated", f"{gated.endpoint}/{REPO_ID}", "request access")
    assert TOKEN not in result.stdout + result.stderr
    if token:
        assert any(s.authorized for s in gated.requests)  # the token was sent, and refused (403)
        assert "no access" in line
    else:
        assert "hf auth login" in line and "HF_TOKEN" in line
    assert not gated.downloads()
    assert not (tmp_path / "model" / biggest_shard(repo_files)).exists()


@pytest.mark.parametrize("case", ["wrong-repo", "wrong-revision", "no-network", "offline-mode"])
def test_hub_errors_give_one_line_with_what_to_do(tmp_path, fake_hub, case):
    kwargs = {"endpoint": fake_hub.endpoint, "HF_TOKEN": TOKEN}
    expected = {
        "wrong-repo": ("glmkit-test/no-such-model", "not found", "model.name_or_path"),
        "wrong-revision": ("'no-such-branch'", "not found", "model.revision"),
        "no-network": ("cannot reach", "rerun download_model.py"),
        "offline-mode": ("HF_HUB_OFFLINE",),
    }[case]
    if case == "wrong-repo":
        kwargs["repo_id"] = "glmkit-test/no-such-model"
    elif case == "wrong-revision":
        kwargs["revision"] = "no-such-branch"
    elif case == "no-network":
        kwargs["endpoint"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    else:
        kwargs["HF_HUB_OFFLINE"] = "1"

    result = run_download(tmp_path, **kwargs)

    assert_clean_failure(result, *expected)
    assert TOKEN not in result.stdout + result.stderr
    assert not fake_hub.downloads()


def test_listing_hiccup_falls_back_to_the_size_estimate(tmp_path, fake_hub, repo_files):
    fake_hub.fail_api(503, times=1)  # only our own pre-flight listing sees it
    result = run_download(tmp_path, endpoint=fake_hub.endpoint)
    if hubmod.free_bytes(str(tmp_path)) < hubmod.FALLBACK_REPO_BYTES:
        # Without the listing the check assumes the full GLM-4.5-Air size, which this disk can't hold.
        assert_clean_failure(result, "not enough free disk space", "estimated")
        fake_hub.fail_api(503, times=1)
        result = run_download(tmp_path, "--min-free-gb", "0", endpoint=fake_hub.endpoint)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: could not list" in result.stdout
    shard = biggest_shard(repo_files)
    assert (tmp_path / "model" / shard).read_bytes() == repo_files[shard]


# ---------------------------------------------------------------------------
# Timeouts: a Hub (or its file server) that accepts connections and never answers
# ---------------------------------------------------------------------------

def test_silent_hub_gives_up_after_the_timeout(tmp_path):
    with silent_server() as (endpoint, accepted):
        start = time.monotonic()
        # Without a timeout this waits forever: the subprocess limit turns that into a test failure.
        result = run_download(tmp_path, "--timeout", "2", endpoint=endpoint, timeout=90)
        elapsed = time.monotonic() - start

    assert accepted, "the command never connected"
    # One request waited, as the message says: no telemetry request (api/agent-harnesses) waited before it.
    assert len(accepted) == 1, len(accepted)
    assert_clean_failure(result, endpoint, "did not answer within 2 s", "--timeout", "rerun download_model.py")
    # Interpreter and library start-up included; the request itself waited about 2 s, once.
    assert elapsed < 45, elapsed
    assert not (tmp_path / "model").exists()


def test_file_server_that_stops_answering_ends_within_a_bound(tmp_path, fake_hub, repo_files):
    shard = biggest_shard(repo_files)
    fake_hub.stall(shard)
    start = time.monotonic()

    result = run_download(tmp_path, "--timeout", "1", endpoint=fake_hub.endpoint, timeout=120)

    elapsed = time.monotonic() - start
    line = assert_clean_failure(result, fake_hub.cdn, fake_hub.endpoint, "did not answer within 1 s")
    assert "rerun download_model.py" in line
    tries = fake_hub.downloads(shard)
    assert 2 <= len(tries) <= 6  # huggingface_hub retried, a bounded number of times
    # Up to 6 tries of about 1 s, 1 s apart, plus start-up: bounded, however long the server stays silent.
    assert elapsed < 60, elapsed


@pytest.mark.parametrize("value", ["0", "-5", "inf", "soon"])
def test_timeout_must_be_a_positive_number(tmp_path, value):
    result = run_download(tmp_path, "--timeout", value, endpoint=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--timeout" in result.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------
# (5) disk space
# ---------------------------------------------------------------------------

def test_download_is_refused_without_enough_disk_space(tmp_path, fake_hub):
    result = run_download(tmp_path, "--min-free-gb", "1e12", endpoint=fake_hub.endpoint)

    assert_clean_failure(result, "not enough free disk space", "--min-free-gb")
    assert not fake_hub.downloads()


def test_disk_check_counts_only_what_is_still_missing(tmp_path, monkeypatch, repo_files):
    model_dir = tmp_path / "model"
    write_repo(model_dir, repo_files)
    shard = biggest_shard(repo_files)
    sizes = {name: len(data) for name, data in repo_files.items()}
    remote = hubmod.RemoteRepo(commit="0" * 40, sizes=sizes, gated=False)
    monkeypatch.setattr(hubmod, "free_bytes", lambda _path: 0)

    hubmod.check_disk_space(str(model_dir), remote, None)  # everything is here: no space needed

    (model_dir / shard).unlink()
    assert hubmod.bytes_still_needed(str(model_dir), sizes) == sizes[shard]
    with pytest.raises(hubmod.HubError, match="not enough free disk space"):
        hubmod.check_disk_space(str(model_dir), remote, None)
    with pytest.raises(hubmod.HubError, match="220 GB|estimated"):
        hubmod.check_disk_space(str(tmp_path / "empty"), None, None)  # no listing: the 220 GB fallback


# ---------------------------------------------------------------------------
# --tiny
# ---------------------------------------------------------------------------

def test_tiny_writes_with_the_generator_then_verifies(tmp_path, monkeypatch, repo_files, capsys):
    import download_model

    calls = []

    def write_tiny_checkpoint(model_dir: str, seed: int = 0, variant: str = "air") -> None:
        calls.append((model_dir, seed, variant))
        write_repo(__import__("pathlib").Path(model_dir), repo_files)

    monkeypatch.setitem(sys.modules, "glmkit.demo.tiny", types.SimpleNamespace(write_tiny_checkpoint=write_tiny_checkpoint))
    model_dir = tmp_path / "tiny"
    config = write_config(tmp_path, model_dir)

    assert download_model.main(["--config", config, "--tiny"]) == 0
    assert calls == [(str(model_dir), 0, "air")]
    assert "verified:" in capsys.readouterr().out
    assert download_model.main(["--config", config, "--tiny", "glm4.6"]) == 0  # GLM-4.6's shape
    assert calls[-1] == (str(model_dir), 0, "glm4.6")
    capsys.readouterr()

    (model_dir / ".cache" / "huggingface").mkdir(parents=True)  # looks like a Hub download now
    assert download_model.main(["--config", config, "--tiny"]) == 1
    assert "holds a Hub download" in capsys.readouterr().err


def test_tiny_with_the_real_generator(tmp_path):
    pytest.importorskip("glmkit.demo.tiny")
    result = run_download(tmp_path, "--tiny", endpoint=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified:" in result.stdout


def test_glm46_is_fetched_when_model_name_or_path_names_it(tmp_path, repo_files):
    """model.name_or_path: zai-org/GLM-4.6 is the repo the download asks the Hub for, and gets, whole."""
    with FakeHub("zai-org/GLM-4.6", repo_files) as hub:
        result = run_download(tmp_path, endpoint=hub.endpoint, repo_id="zai-org/GLM-4.6")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "downloading zai-org/GLM-4.6 @ main" in result.stdout and "verified:" in result.stdout
        assert {s.file for s in hub.downloads()} == set(repo_files)
    assert set(repo_files) <= set(os.listdir(tmp_path / "model"))


def test_download_model_offers_every_tiny_variant():
    import download_model
    from glmkit.demo.tiny import TINY_VARIANTS

    assert download_model.TINY_VARIANT_NAMES == tuple(TINY_VARIANTS)
