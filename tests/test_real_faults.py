"""Real faults, not injected ones (issue 25): a small disk that another process fills at the moment the kit
writes, real SIGKILLs inside a folder swap (renames slowed with strace), a launcher killed under its ranks,
and a second trainer refused by a running one.

The full-disk tests mount a tmpfs, which needs root (CI runs as root); elsewhere they are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_cli, write_tiny_config

from glmkit.run.logs import read_jsonl

NICE = ["nice", "-n", "15"]  # the kit runs behind the filler, so the filler wins the race to the disk


def paused_at_mkdir(path: str) -> list[str]:
    """A command prefix that holds the kit 2 s right after it creates the folder `path` (strace, if present).

    The filler sees the new folder and fills the disk while the writer is held, so the write that follows
    meets a full disk however loaded the machine is; without strace, `nice` alone makes the race likely.
    """
    if shutil.which("strace") is None:
        return NICE
    return [*NICE, "strace", "-f", "--seccomp-bpf", "-o", os.devnull, "-P", path, "-e", "trace=mkdir,mkdirat",
            "-e", "inject=mkdir,mkdirat:delay_exit=2000000"]
KIT_LAUNCH = ("-m", "glmkit.launch.accelerate", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no")
CPU_ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
# The shortest run that evaluates (so the best adapter is written) and checkpoints at step 1.
SHORT_RUN = {"training.max_steps": 1, "training.max_seq_length": 64, "logging.eval_interval": 1,
             "checkpoint.interval": 1, "logging.expert_stats_interval": 1}

# Another process: wait for a path matching the pattern to appear under the disk, then take every free
# byte (4 MiB, then 64 KiB, then 4 KiB at a time) and say so in <mount>/.filled.
FILLER = r"""
import glob, os, sys, time
mount, pattern = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 600
while not glob.glob(os.path.join(mount, pattern)):
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.001)
fd = os.open(os.path.join(mount, ".ballast"), os.O_WRONLY | os.O_CREAT, 0o600)
size = os.fstat(fd).st_size
for chunk in (4 << 20, 64 << 10, 4 << 10):
    while True:
        try:
            os.posix_fallocate(fd, size, chunk)
        except OSError:
            break
        size += chunk
os.close(fd)
open(os.path.join(mount, ".filled"), "w").close()
"""


class SmallDisk:
    def __init__(self, path):
        self.path = str(path)
        self.filler = None

    def fill_when(self, pattern: str) -> None:
        """Start the filler: it takes the whole disk once `pattern` (a glob under the disk) exists."""
        self.free()
        self.filler = subprocess.Popen([sys.executable, "-c", FILLER, self.path, pattern])

    def filled(self) -> bool:
        return os.path.exists(os.path.join(self.path, ".filled"))

    def free(self) -> None:
        if self.filler is not None and self.filler.poll() is None:
            self.filler.kill()
        if self.filler is not None:
            self.filler.wait()
        self.filler = None
        for name in (".ballast", ".filled"):
            if os.path.exists(os.path.join(self.path, name)):
                os.remove(os.path.join(self.path, name))


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, which needs root (CI runs as root); not root here")
    mount = tmp_path_factory.mktemp("small-disk")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): the full-disk tests need one")
    disk = SmallDisk(mount)
    yield disk
    disk.free()
    subprocess.run(["umount", "-l", str(mount)], check=False)


def last_line(result) -> str:
    """The kit's last `error:` line (torch elastic adds its own log lines after a rank's exit)."""
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    return lines[-1] if lines else ""


def assert_one_line_failure(result):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def error_reported(result, logs_dir) -> bool:
    """The error record was written, or (the log's disk being full) a note on stderr says it could not be."""
    records = read_jsonl(os.path.join(logs_dir, "error_log.jsonl"))
    return any(r["type"] == "WriteFailed" for r in records) or "the error record could not be written" in result.stderr


# ---------------------------------------------------------------------------
# A full disk during training: two processes, the checkpoint; then the best adapter; then a merge shard
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def disk_run(small_disk, tmp_path_factory, tiny_model_dir, demo_corpus):
    """Two processes train on the small disk; it fills when step 1's checkpoint starts being written."""
    tmp = tmp_path_factory.mktemp("disk-run")
    # Two steps: step 1's checkpoint is a periodic one (the last step's is the final checkpoint, written once).
    config = write_tiny_config(tmp, tiny_model_dir, demo_corpus, {**SHORT_RUN, "training.max_steps": 2})
    with open(config, encoding="utf-8") as fh:
        text = fh.read()
    text = text.replace(str(tmp / "run"), os.path.join(small_disk.path, "run"))
    text = text.replace(str(tmp / "best"), os.path.join(small_disk.path, "best"))
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(text)
    small_disk.fill_when("run/.tmp-checkpoint-1")
    started = time.monotonic()
    result = subprocess.run([*paused_at_mkdir(os.path.join(small_disk.path, "run", ".tmp-checkpoint-1")),
                             sys.executable, *KIT_LAUNCH, "train_qlora.py", "--config", config], cwd=ROOT,
                            env={**os.environ, **CPU_ENV, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
                            capture_output=True, text=True, timeout=600)
    return {"result": result, "seconds": time.monotonic() - started, "config": config,
            "out": os.path.join(small_disk.path, "run"), "best": os.path.join(small_disk.path, "best")}


@pytest.mark.trains
def test_full_disk_during_a_checkpoint_stops_every_rank_with_one_line(disk_run, small_disk):
    result, out = disk_run["result"], disk_run["out"]
    assert small_disk.filled(), "the filler never saw the checkpoint being written"
    assert_one_line_failure(result)
    line = last_line(result)
    assert line.startswith(f"error: could not write checkpoint {out}/checkpoint-1: no space left on device; "), line
    assert "no earlier checkpoint exists" in line and "resume with --resume" in line
    assert not [n for n in os.listdir(out) if "checkpoint" in n]  # the partial folder is gone
    assert error_reported(result, os.path.join(out, "logs"))
    # Both ranks stopped at once; a rank left in the reduce would wait out gloo's 30-minute timeout.
    assert result.stderr.count("error: could not write checkpoint") == 2
    assert disk_run["seconds"] < 400
    assert os.path.isfile(os.path.join(disk_run["best"], "best.json"))  # written at step 1, before the checkpoint


@pytest.mark.trains
def test_full_disk_writing_the_best_adapter_keeps_the_previous_one(disk_run, small_disk):
    best = disk_run["best"]
    with open(os.path.join(best, "best.json"), encoding="utf-8") as fh:
        before = fh.read()
    shutil.rmtree(disk_run["out"])  # a fresh run, so that step 1 improves on nothing and writes a new best
    small_disk.fill_when("best.tmp")
    result = subprocess.run([*paused_at_mkdir(f"{best}.tmp"), sys.executable, "train_qlora.py", "--config",
                             disk_run["config"]], cwd=ROOT,
                            env={**os.environ, **CPU_ENV, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
                            capture_output=True, text=True, timeout=600)
    assert small_disk.filled()
    assert_one_line_failure(result)
    line = last_line(result)
    assert line.startswith(f"error: could not write the best adapter {best}: no space left on device; "), line
    assert f"the previous best adapter in {best} is intact" in line
    assert not os.path.exists(f"{best}.tmp")
    with open(os.path.join(best, "best.json"), encoding="utf-8") as fh:
        assert fh.read() == before
    assert error_reported(result, os.path.join(disk_run["out"], "logs"))


@pytest.mark.trains
def test_full_disk_writing_a_merge_shard(disk_run, small_disk, tiny_model_dir):
    partial = os.path.join(small_disk.path, ".merged.merge-partial")
    small_disk.fill_when(".merged.merge-partial")  # held at its mkdir: the shards are written to a full disk
    out = os.path.join(small_disk.path, "merged")
    result = subprocess.run([*paused_at_mkdir(partial), sys.executable, "use_adapter.py", "--config", disk_run["config"],
                             "--adapter", disk_run["best"], "--merge", out], cwd=ROOT,
                            env={**os.environ, **CPU_ENV, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert small_disk.filled()
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: could not write the merged model {out}: no space left on device; "), line
    assert f"the base model in {tiny_model_dir}" in line and "rerun --merge" in line
    assert not os.path.exists(out) and not os.path.exists(os.path.join(small_disk.path, ".merged.merge-partial"))


def test_full_disk_writing_a_token_store(small_disk, tmp_path, tiny_model_dir, demo_corpus, capsys):
    from glmkit.config.load import load_config
    from glmkit.data.prepare import run_prepare_cli

    scratch = os.path.join(small_disk.path, "scratch")
    config = write_tiny_config(tmp_path, tiny_model_dir, demo_corpus, {"performance.tokenizer_workers": 1})
    cfg = load_config(config, [f"paths.scratch_dir={scratch}"])
    small_disk.fill_when("scratch/tokenized/files/*.tmp-*/tokens.u32")
    status = run_prepare_cli(cfg)
    err = capsys.readouterr().err
    assert small_disk.filled()
    assert status == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: could not write the data cache {scratch}/tokenized/files: no space left on "
                           f"device; "), line
    leftovers = [name for _, dirs, _ in os.walk(scratch) for name in dirs if ".tmp-" in name]
    assert not leftovers


# ---------------------------------------------------------------------------
# Atomic swaps: a real SIGKILL inside the (slowed) renames never leaves the folder missing
# ---------------------------------------------------------------------------

SWAP = r"""
import sys
from glmkit.run.swap import swap_in
print("swapping", flush=True)
swap_in(sys.argv[1], sys.argv[2])
print("swapped", flush=True)
"""


def write_folder(path, content: str) -> None:
    """A best-adapter folder whose marker lists its one other file, as the kit writes it."""
    os.makedirs(path)
    with open(os.path.join(path, "adapter_model.safetensors"), "w", encoding="utf-8") as fh:
        fh.write(content)
    from glmkit.run.manifest import file_manifest

    listed = file_manifest(path)
    with open(os.path.join(path, "best.json"), "w", encoding="utf-8") as fh:
        json.dump({"files": listed}, fh)


def content_of(path) -> str | None:
    try:
        with open(os.path.join(path, "adapter_model.safetensors"), encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


@pytest.mark.parametrize("kill_after", [0.5, 1.5])
def test_sigkill_inside_the_swap_leaves_the_old_or_the_new_folder(tmp_path, kill_after):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: the renames cannot be slowed enough to kill between them")
    target, new = str(tmp_path / "best"), str(tmp_path / "best.tmp")
    write_folder(target, "old")
    write_folder(new, "new")
    # Every rename waits 1 s before it happens: the window between two renames is then 1 s wide.
    process = subprocess.Popen(["strace", "-f", "-o", os.devnull, "-e",
                                "inject=rename,renameat,renameat2:delay_enter=1000000",
                                sys.executable, "-c", SWAP, new, target], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert process.stdout.readline().strip() == "swapping"
    started, missing_seen = time.monotonic(), 0
    while time.monotonic() - started < kill_after:
        missing_seen += content_of(target) is None  # what a reader (use_adapter.py) would find
        time.sleep(0.001)
    process.kill()
    process.wait()
    assert missing_seen == 0
    assert content_of(target) in ("old", "new")


def test_recovery_puts_back_a_folder_a_kill_left_missing(tmp_path):
    from glmkit.train import checkpoint as ckpt

    # The two-rename fallback killed between its renames: no target, both copies whole.
    best = str(tmp_path / "best")
    write_folder(f"{best}.old", "old")
    write_folder(f"{best}.tmp", "new")
    assert ckpt.recover_best_adapter(best) == f"{best}.tmp"
    assert content_of(best) == "new"
    # A rewritten checkpoint-N killed after the old copy went: its complete temp folder is promoted,
    # a half-written one (no marker) and a damaged one are not.
    out = tmp_path / "run"
    for step in (2, 3, 4):
        os.makedirs(out / f".tmp-checkpoint-{step}")
        (out / f".tmp-checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
        ckpt.finalize(str(out / f".tmp-checkpoint-{step}"), str(out / f"checkpoint-{step}"), {"step": step},
                      {"training": {"seed": 1}})
        os.rename(out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}")
    os.remove(out / ".tmp-checkpoint-3" / "COMPLETE")
    (out / ".tmp-checkpoint-4" / "adapter_model.safetensors").write_bytes(b"weights 5")
    promoted = ckpt.recover_interrupted_swaps(str(out))
    assert promoted == [(str(out / ".tmp-checkpoint-2"), str(out / "checkpoint-2"))]
    assert ckpt.verify(str(out / "checkpoint-2")) is None
    ckpt.clean_incomplete(str(out))
    assert sorted(os.listdir(out)) == ["checkpoint-2"]


# ---------------------------------------------------------------------------
# Process hygiene
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_refused_trainer_writes_nothing_into_the_running_runs_logs(make_config, tmp_path):
    from glmkit.run.lock import RunLock

    config = make_config(SHORT_RUN)
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "error_log.jsonl").write_text("")
    (logs / "events_log.jsonl").write_text(json.dumps({"step": 0, "time": 0, "event": "run_start"}) + "\n")
    before = {name: (logs / name).read_bytes() for name in os.listdir(logs)}
    lock = RunLock(str(tmp_path / "run"))
    lock.acquire()  # a running trainer, as far as the kernel is concerned: the same flock
    try:
        result = run_cli(["train_qlora.py", "--config", config, "--resume"])
    finally:
        lock.release()
    assert_one_line_failure(result)
    assert "is in use by another trainer" in last_line(result)
    assert {name: (logs / name).read_bytes() for name in os.listdir(logs)} == before


@pytest.mark.parametrize("launched, refused", [("MULTI_CPU", False), ("MULTI_GPU", False), ("FSDP", True),
                                               ("DEEPSPEED", True)])
def test_trainer_refuses_accelerates_own_sharding_plugins(tmp_path, launched, refused):
    """fsdp and ddp both start as plain multi-process launches; Accelerate's FSDP/DeepSpeed plugins are refused."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from glmkit.config.load import load_config
    from glmkit.train.distributed import LaunchMismatch, check_launched_strategy

    (tmp_path / "c.yaml").write_text("distributed:\n  accelerate_config: fsdp\n")
    accelerator = SimpleNamespace(distributed_type=DistributedType[launched], num_processes=2)
    if not refused:
        check_launched_strategy(load_config(tmp_path / "c.yaml"), accelerator)
        return
    with pytest.raises(LaunchMismatch, match=r"^this run was launched with Accelerate's .*, which cannot shard "
                                             r"the kit's 4-bit weights; distributed.accelerate_config is fsdp"):
        check_launched_strategy(load_config(tmp_path / "c.yaml"), accelerator)


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task") if os.path.isdir(f"/proc/{parent}/task") else []:
            try:
                with open(f"/proc/{parent}/task/{task}/children", encoding="ascii") as fh:
                    children = [int(c) for c in fh.read().split()]
            except OSError:
                continue
            todo += [c for c in children if c not in found]
            found.update(children)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.trains
def test_ranks_exit_when_their_launcher_is_killed(make_config, tmp_path):
    config = make_config({**SHORT_RUN, "training.max_steps": 40})
    with open(tmp_path / "launch.log", "w") as log:
        launcher = subprocess.Popen([sys.executable, *KIT_LAUNCH, "train_qlora.py", "--config", config], cwd=ROOT,
                                    env={**os.environ, **CPU_ENV, "TOKENIZERS_PARALLELISM": "false"},
                                    stdout=log, stderr=subprocess.STDOUT)
        lock_file = tmp_path / "run" / ".trainer.lock"
        deadline = time.monotonic() + 300
        # The lock is taken once both ranks are up (the accelerator joined them), past the parent-death request.
        while not (lock_file.exists() and lock_file.read_text().strip()) and time.monotonic() < deadline:
            assert launcher.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
            time.sleep(0.2)
        ranks = [pid for pid in descendants(launcher.pid) if alive(pid)]
        assert len(ranks) >= 2, ranks
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 120
        while any(map(alive, ranks)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in ranks if alive(pid)]
        for pid in left:  # do not leave them training on a failure
            os.kill(pid, signal.SIGKILL)
    assert not left, (tmp_path / "launch.log").read_text()[-3000:]


# ---------------------------------------------------------------------------
# Power cuts: what is renamed into place is on disk first, and a damaged copy is found before it is read
# ---------------------------------------------------------------------------

SYNCED = re.compile(r"\b(?:fsync|fdatasync)\(\d+<(?P<path>[^>]*)>")
RENAMED = re.compile(r"\brename(?:at2?)?\((?:[^,]*, )?\"(?P<src>[^\"]+)\", (?:[^,]*, )?\"(?P<dst>[^\"]+)\"")


def sync_trace(path) -> list[tuple]:
    """[("fsync", path) | ("rename", src, dst)] in the order an `strace -f -y` log shows them."""
    events = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if (match := SYNCED.search(line)) and "resumed>" not in line:
                events.append(("fsync", match["path"]))
            elif (match := RENAMED.search(line)) and line.rstrip().endswith("= 0"):
                events.append(("rename", match["src"], match["dst"]))
    return events


@pytest.mark.trains
def test_every_folder_renamed_into_place_is_flushed_first_and_its_parent_after(make_config, tmp_path):
    """A token store, the rows, the best adapter and the checkpoints: every file and the folder fsynced before
    the rename that makes them visible, the parent folder (output_dir, ...) after it (strace of a real run)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: the fsync and rename calls cannot be watched")
    config = make_config({**SHORT_RUN, "training.max_steps": 2})  # checkpoint-1, then the final checkpoint-2
    trace = tmp_path / "strace.txt"
    result = subprocess.run(["strace", "-f", "-qq", "-y", "-o", str(trace), "-e",
                             "trace=fsync,fdatasync,rename,renameat,renameat2", sys.executable, "train_qlora.py",
                             "--config", config], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    events = sync_trace(trace)
    scratch = tmp_path / "scratch" / "tokenized"
    targets = [os.path.join(scratch, kind, name) for kind in ("files", "rows") for name in os.listdir(scratch / kind)]
    targets += [str(tmp_path / "best"), str(tmp_path / "run" / "checkpoint-1"), str(tmp_path / "run" / "final-checkpoint-2")]
    for target in targets:
        renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == target]
        assert renames, f"no rename into {target}"
        at, src = renames[-1], events[renames[-1]][1]
        synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
        files = [os.path.join(src, os.path.relpath(os.path.join(root, n), target))
                 for root, _, names in os.walk(target) for n in names]
        assert files and not [f for f in files if f not in synced_before], (target, synced_before)
        assert src in synced_before, f"the folder {src} was not flushed before its rename"
        assert ("fsync", os.path.dirname(target)) in events[at + 1:], f"{os.path.dirname(target)} not flushed after"


@pytest.mark.trains
@pytest.mark.parametrize("action, damage", [("--merge", "zeroed tail"), ("--sample", "cut to 0 bytes"),
                                            ("--export-serving", "zeroed tail")])
def test_a_damaged_best_adapter_is_one_line_naming_the_file(expert_run, tmp_path, action, damage):
    """A power cut's images of a completed best adapter: --merge wrote a merged model from the damaged weights
    (exit 0), --sample stopped on a SafetensorError traceback. Each now refuses before reading a weight."""
    best = tmp_path / "best"
    shutil.copytree(expert_run["best"], best)
    weights = best / "adapter_model.safetensors"
    size = os.path.getsize(weights)
    if damage == "cut to 0 bytes":
        os.truncate(weights, 0)
    else:  # the size kept, the last 4,000 bytes zeros
        with open(weights, "r+b") as fh:
            fh.seek(size - 4000)
            fh.write(b"\0" * 4000)
    out = tmp_path / "out"
    result = run_cli(["use_adapter.py", "--config", expert_run["config"], "--adapter", str(best), action,
                      "The module" if action == "--sample" else str(out)])
    assert_one_line_failure(result)
    says = (f"has 0 bytes, {size:,} were written" if damage == "cut to 0 bytes"
            else "does not match its checksum (its content changed after it was written)")
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the adapter {best} is damaged: adapter_model.safetensors {says}; point --adapter at another copy "
        f"of it (each checkpoint-N folder of the run holds its step's adapter)")
    assert sorted(os.listdir(tmp_path)) == ["best"]  # no output, no partial folder


# ---------------------------------------------------------------------------
# A hostile model folder: an index naming a shard outside it
# ---------------------------------------------------------------------------

def hostile_model(tiny_model_dir, folder, where: str) -> tuple[str, str, str]:
    """A copy of the tiny model whose index maps one tensor to a real shard outside the folder, named by `../`
    or by its absolute path. Returns (model dir, the outside shard, the index's name for it)."""
    model = os.path.join(folder, "model")
    shutil.copytree(tiny_model_dir, model)
    index_path = os.path.join(model, "model.safetensors.index.json")
    with open(index_path, encoding="utf-8") as fh:
        index = json.load(fh)
    tensor = "model.embed_tokens.weight"
    outside = os.path.join(folder, "outside.safetensors")
    shutil.copyfile(os.path.join(model, index["weight_map"][tensor]), outside)
    named = "../outside.safetensors" if where == "relative" else outside
    index["weight_map"][tensor] = named
    with open(index_path, "w", encoding="utf-8") as fh:
        json.dump(index, fh)
    return model, outside, named


@pytest.mark.trains
@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_sample_refuses_an_index_naming_a_shard_outside_the_model_folder(expert_run, tiny_model_dir, tmp_path,
                                                                         where):
    """--sample loaded such a shard; like the trainer, --merge and --verify-only it now refuses in one line,
    by the same check (glmkit.hub.verify.shard_map), and nothing opens the outside file (strace)."""
    model, outside, named = hostile_model(tiny_model_dir, tmp_path, where)
    index = os.path.join(model, "model.safetensors.index.json")
    says = (f"{index}: maps model.embed_tokens.weight to {named!r}, which is not a file in this folder; a weight_map "
            f"names shard files beside the index only")
    watch = ["strace", "-f", "-qq", "-o", str(tmp_path / "openat.txt"), "-e", "trace=open,openat"] \
        if shutil.which("strace") else []
    sample = subprocess.run([*watch, sys.executable, "use_adapter.py", "--config", expert_run["config"], "--set",
                             f"paths.model_dir={model}", "--sample", "The module"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert_one_line_failure(sample)
    assert sample.stderr.strip().splitlines()[-1] == (f"error: {says}; `python download_model.py --verify-only` "
                                                      f"lists what to fix")
    if watch:
        assert "outside.safetensors" not in (tmp_path / "openat.txt").read_text()
    if where == "relative":  # the others refuse by the same words
        merge = run_cli(["use_adapter.py", "--config", expert_run["config"], "--set", f"paths.model_dir={model}",
                         "--merge", str(tmp_path / "merged")])
        assert_one_line_failure(merge)
        assert merge.stderr.strip().splitlines()[-1].startswith(f"error: {says}; ")
        verify = run_cli(["download_model.py", "--config", expert_run["config"], "--set", f"paths.model_dir={model}",
                          "--verify-only"])
        assert verify.returncode != 0 and says in verify.stdout + verify.stderr, verify.stdout + verify.stderr
        train = run_cli(["train_qlora.py", "--config", expert_run["config"], "--set", f"paths.model_dir={model}",
                         "--set", f"paths.output_dir={tmp_path / 'run'}", "--set",
                         f"paths.best_adapter_dir={tmp_path / 'best'}", "--set", f"paths.scratch_dir={tmp_path / 'scratch'}"])
        assert_one_line_failure(train)
        assert last_line(train).startswith(f"error: {says}; ")


# ---------------------------------------------------------------------------
# A dropped SSH session: the terminal hangs up under a running run
# ---------------------------------------------------------------------------

def _take_terminal():  # in the child, after setsid: the pty becomes its controlling terminal, as a login's does
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    for sig in (signal.SIGHUP, signal.SIGINT):  # a login's defaults, whatever the test runner ignores (nohup)
        signal.signal(sig, signal.SIG_DFL)


class Terminal:
    """A command run on a pseudo-terminal as its controlling terminal, as an SSH session runs it. `hang_up()`
    closes the terminal as sshd does when the connection drops: the kernel sends SIGHUP to the foreground
    process group, and every later write to the terminal fails."""

    def __init__(self, cmd: list[str], env: dict, cwd=ROOT):
        import threading

        self.master, slave = os.openpty()
        self.process = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                                        start_new_session=True, preexec_fn=_take_terminal)
        os.close(slave)
        self.output, self._stop = bytearray(), threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:  # keep the terminal drained, or the run blocks on a full terminal buffer
        import select

        while not self._stop.is_set():
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    return
                if not data:
                    return
                self.output += data

    def hang_up(self) -> None:
        self._stop.set()
        self._reader.join()
        os.close(self.master)

    def text(self) -> str:
        return self.output.decode(errors="replace")


def run_then_hang_up(cmd: list[str], logs, env: dict, after_steps: int = 3) -> Terminal:
    terminal = Terminal(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **env})
    deadline = time.monotonic() + 300
    while len(read_jsonl(str(logs / "training_log.jsonl"))) < after_steps:
        assert terminal.process.poll() is None and time.monotonic() < deadline, terminal.text()[-3000:]
        time.sleep(0.2)
    terminal.hang_up()
    return terminal


LONG_RUN = {**SHORT_RUN, "training.max_steps": 400, "logging.eval_interval": 200, "checkpoint.interval": 200}


def assert_preempted_by_hangup(out, ranks: int) -> None:
    from glmkit.train.checkpoint import verify

    events = read_jsonl(str(out / "logs" / "events_log.jsonl"))
    assert [e["event"] for e in events[-2:]] == ["preempted", "run_end"], events[-3:]
    assert events[-2]["signal"] == "SIGHUP" and events[-1]["status"] == "preempted"
    step = events[-1]["step"]
    assert len(read_jsonl(str(out / "logs" / "training_log.jsonl"))) == step  # saved where it stopped: nothing lost
    assert verify(str(out / f"checkpoint-{step}")) is None
    assert os.path.isfile(out / f"checkpoint-{step}" / f"random_states_{ranks - 1}.pkl")  # every rank's state
    assert read_jsonl(str(out / "logs" / "error_log.jsonl")) == []


@pytest.mark.trains
def test_a_hung_up_terminal_preempts_the_trainer(make_config, tmp_path):
    """`python train_qlora.py` in the foreground of an SSH session that drops: it used to die at once (no
    checkpoint, no run_end, a dashboard "stalled" for good); now SIGHUP is a preemption, and the trainer writes
    nothing more to the gone terminal (each write would fail with EIO)."""
    config = make_config(LONG_RUN)
    terminal = run_then_hang_up([sys.executable, "train_qlora.py", "--config", config], tmp_path / "run" / "logs", {})
    assert terminal.process.wait(timeout=300) == 0
    assert_preempted_by_hangup(tmp_path / "run", ranks=1)


@pytest.mark.trains
def test_under_nohup_the_run_outlives_the_terminal(make_config, tmp_path):
    """`nohup` asks for the run to survive the hangup: the trainer keeps SIGHUP ignored and trains on."""
    if shutil.which("nohup") is None:
        pytest.skip("nohup is not installed")
    config = make_config(LONG_RUN)
    logs = tmp_path / "run" / "logs"
    terminal = Terminal(["nohup", sys.executable, os.path.join(ROOT, "train_qlora.py"), "--config", config],
                        env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while len(read_jsonl(str(logs / "training_log.jsonl"))) < 3:
        assert terminal.process.poll() is None and time.monotonic() < deadline, terminal.text()[-3000:]
        time.sleep(0.2)
    terminal.hang_up()
    at_hangup = len(read_jsonl(str(logs / "training_log.jsonl")))
    while len(read_jsonl(str(logs / "training_log.jsonl"))) < at_hangup + 3:
        assert terminal.process.poll() is None and time.monotonic() < deadline, (tmp_path / "nohup.out").read_text()
        time.sleep(0.2)
    terminal.process.send_signal(signal.SIGTERM)  # a scheduler's stop, which it still honours
    assert terminal.process.wait(timeout=300) == 0
    events = read_jsonl(str(logs / "events_log.jsonl"))
    assert events[-2]["event"] == "preempted" and events[-2]["signal"] == "SIGTERM"


@pytest.mark.trains
def test_a_hung_up_terminal_preempts_every_rank_through_the_launcher(make_config, tmp_path):
    """The kit's launcher with two ranks (each in a session of its own, out of the terminal's reach): the
    launcher takes the SIGHUP, passes it to both ranks, which save together and exit 0, and so does it."""
    config = make_config(LONG_RUN)
    terminal = run_then_hang_up([sys.executable, *KIT_LAUNCH, "train_qlora.py", "--config", config],
                                tmp_path / "run" / "logs", CPU_ENV)
    ranks = [pid for pid in descendants(terminal.process.pid) if alive(pid)]
    assert terminal.process.wait(timeout=300) == 0
    assert not [pid for pid in ranks if alive(pid)]
    assert_preempted_by_hangup(tmp_path / "run", ranks=2)


# ---------------------------------------------------------------------------
# A rank SIGKILLed (the OOM killer's way): the kit says which, and records it
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_a_killed_rank_is_named_by_the_launcher_and_in_the_error_log(make_config, tmp_path):
    config = make_config({**SHORT_RUN, "training.max_steps": 400, "logging.eval_interval": 200,
                          "checkpoint.interval": 200})
    logs = tmp_path / "run" / "logs"
    with open(tmp_path / "launch.log", "w") as log:
        launcher = subprocess.Popen([sys.executable, *KIT_LAUNCH, "train_qlora.py", "--config", config], cwd=ROOT,
                                    env={**os.environ, **CPU_ENV, "TOKENIZERS_PARALLELISM": "false"},
                                    stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while len(read_jsonl(str(logs / "training_log.jsonl"))) < 3:
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "launch.log").read_text()
            time.sleep(0.2)
        from glmkit.launch.accelerate import children

        rank1 = [pid for pid in children(launcher.pid) if b"RANK=1" in  # the ranks: the launcher's own children
                 open(f"/proc/{pid}/environ", "rb").read().split(b"\0")]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGKILL)
        assert launcher.wait(timeout=300) == 128 + signal.SIGKILL
    said = (tmp_path / "launch.log").read_text()
    assert (f"launch: rank 1 (pid {rank1[0]}) was killed by SIGKILL: a killed process writes nothing itself (out "
            f"of memory? `dmesg | grep -i kill` lists the kernel's kills)") in said
    assert "error: rank 0: another process of this run is gone (a collective lost its connection: " in said
    assert "Traceback" not in said
    killed = [e for e in read_jsonl(str(logs / "error_log.jsonl")) if e["rank"] == 1]
    assert len(killed) == 1 and killed[0]["type"] == "ProcessKilled" and "was killed by SIGKILL" in killed[0]["message"]
    assert killed[0]["step"] >= 3


# ---------------------------------------------------------------------------
# A model far bigger than the machine, on CPU: refused by the memory plan before anything is allocated
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_a_model_bigger_than_host_memory_is_refused_on_cpu_before_allocating(tiny_model_dir, demo_corpus, tmp_path):
    """hidden_size 10**9 made the CPU trainer try to allocate 8 TB (a raw traceback): the plan was checked on
    GPUs only. Under an address-space cap, so that a regression fails here instead of swapping the machine."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": 10**9}))
    run_config = write_tiny_config(tmp_path, str(model), demo_corpus, SHORT_RUN)
    cap = ["prlimit", "--as=8000000000"] if shutil.which("prlimit") else []
    result = subprocess.run([*cap, sys.executable, "train_qlora.py", "--config", run_config], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert_one_line_failure(result)
    line = last_line(result)
    assert line.startswith("error: memory plan: DOES NOT FIT in host memory - 1 process(es) x "), line
    assert "the model's weights alone take" in line and line.endswith("; pass --force to start anyway")
    assert not os.path.exists(tmp_path / "run" / "logs" / "events_log.jsonl") or not read_jsonl(
        str(tmp_path / "run" / "logs" / "events_log.jsonl"))  # no run_start: nothing was loaded
