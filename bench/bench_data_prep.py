#!/usr/bin/env python3
"""Preparing a CPT corpus: the pipeline before issue 13 against the sharded, memory-mapped one.

Corpora of about 256 MiB and 1 GiB of JSONL text are generated under scratch/bench-data
(git-ignored): documents built from the demo corpus's prose, each made unique, written as
shards of about 32 MiB of text, every other shard gzip-compressed (`.jsonl.gz`). Each
measurement runs in a fresh subprocess with the tiny model's tokenizer:

- old:  the previous `glmkit/data.py` (taken from git at OLD_COMMIT): the whole file read into
        Python lists, every text joined for the cache key, `datasets.map` in one process into
        int64 Arrow. It reads one JSONL file, so it gets the same documents as one
        uncompressed file; it runs at 256 MiB only (at 1 GiB it needed 7.5 GB here);
- new:  `glmkit.data.prepare.prepare_data` on the sharded folder, with 1 and 2 tokenizer workers.

Measured: wall time of the preparation (cold cache, and again warm), tokens per second
(corpus tokens / cold wall time, end to end: reading, decompressing, tokenizing, writing,
laying out rows), the peak anonymous memory of the whole process tree (the sum of Pss_Anon
over the process and all its children, sampled every 50 ms: anonymous memory is what must
fit in RAM; the memory-mapped cache is file-backed and evictable), and the cache's bytes per
token. Last, two processes prepare the same cold cache at once, as two ranks of a run do:
one tokenizes, the other waits on the lock and memory-maps; the peak of each is reported.

    .venv/bin/python bench/bench_data_prep.py [--sizes 256 1024] [--keep]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import benchlib

OLD_COMMIT = "f1e5bc5"  # main before issue 13: glmkit/data.py with load_corpus + tokenize_split
WORK = os.path.join(benchlib.SCRATCH, "bench-data")
SHARD_TEXT_BYTES = 32 * 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="corpus sizes in MiB of JSONL text")
    p.add_argument("--old-max-mib", type=int, default=256, help="largest corpus the old pipeline is run on")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora and caches")
    p.add_argument("--out", default=benchlib.default_out("data_prep"))
    p.add_argument("--worker", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------

def write_corpus(folder: str, mib: int, single_file: str | None) -> dict:
    """Sharded corpus of about `mib` MiB of JSONL text (odd shards gzip); optionally the same as one file."""
    if os.path.isfile(os.path.join(folder, "DONE")):
        with open(os.path.join(folder, "DONE"), encoding="utf-8") as fh:
            return json.load(fh)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(os.path.join(benchlib.REPO_ROOT, "data", "demo.jsonl"), encoding="utf-8") as fh:
        prose = [json.loads(line)["text"] for line in fh]
    rng = random.Random(mib)
    single = open(single_file, "w", encoding="utf-8") if single_file else None
    target, written, shard, docs = mib * 2**20, 0, 0, 0
    while written < target:
        name = os.path.join(folder, f"part-{shard:04d}.jsonl" + (".gz" if shard % 2 else ""))
        out = gzip.open(name, "wt", encoding="utf-8", compresslevel=6) if shard % 2 else open(name, "w", encoding="utf-8")
        size = 0
        with out:
            while size < SHARD_TEXT_BYTES and written + size < target:
                # Two demo documents, cut at random points, under a unique title: realistic prose, no duplicates.
                a, b = rng.choice(prose), rng.choice(prose)
                text = f"Document {docs}.\n" + a[rng.randrange(len(a) // 2):] + "\n\n" + b[: rng.randrange(len(b)) + 1]
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                if single:
                    single.write(line)
                size += len(line)
                docs += 1
        written += size
        shard += 1
    if single:
        single.close()
    info = {"mib": mib, "shards": shard, "gz_shards": shard // 2, "docs": docs, "text_bytes": written,
            "bytes_on_disk": sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))}
    with open(os.path.join(folder, "DONE"), "w", encoding="utf-8") as fh:
        json.dump(info, fh)
    return info


# ---------------------------------------------------------------------------
# Memory of a process tree
# ---------------------------------------------------------------------------

def anon_kib(pid: int) -> int:
    """Proportional anonymous memory (Pss_Anon), so pages a fork shares are not counted twice."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler:
    """Peak over time of the summed anonymous memory of each watched process and its descendants."""

    def __init__(self, roots: list[int], interval: float = 0.05):
        self.roots, self.interval = roots, interval
        self.peaks = {pid: 0 for pid in roots}
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for root in self.roots:
                try:
                    tree = [root] + [c.pid for c in psutil.Process(root).children(recursive=True)]
                except psutil.Error:
                    continue
                kib = sum(anon_kib(pid) for pid in tree)
                self.peaks[root] = max(self.peaks[root], kib)
                total += kib
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------
# One preparation, in a fresh process
# ---------------------------------------------------------------------------

def tokenizer_and_cfg(data: str, scratch: str, workers: int):
    benchlib.quiet()
    from transformers import AutoTokenizer

    cfg = benchlib.tiny_config([f"paths.data_path={data}", f"paths.scratch_dir={scratch}",
                                f"performance.tokenizer_workers={workers}", "training.max_seq_length=4096",
                                "training.val_fraction=0.01"])
    return AutoTokenizer.from_pretrained(cfg.paths.model_dir), cfg


def worker(args) -> dict:
    tokenizer, cfg = tokenizer_and_cfg(args.data, args.scratch, args.workers)
    if args.worker == "old":
        old = load_old_pipeline()
        started = time.time()
        corpus = old.load_corpus(cfg)
        cache_dir = f"{cfg.paths.scratch_dir}/tokenized/{corpus.fingerprint}"
        train = old.tokenize_split(corpus.train_docs, tokenizer, cfg, cache_dir, "train")
        val = old.tokenize_split(corpus.val_docs, tokenizer, cfg, cache_dir, "val")
        seconds = time.time() - started
        rows = len(train) + len(val)
        cache = sum(os.path.getsize(os.path.join(cache_dir, n)) for n in os.listdir(cache_dir))
        tokens = sum(real_tokens(split) for split in (train, val))
    else:
        import resource

        from glmkit.data.prepare import cache_bytes, prepare_data

        cpu = lambda who: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(who))  # noqa: E731
        main0, workers0, started = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.time()
        prepared = prepare_data(cfg, tokenizer, show_progress=False)
        seconds = time.time() - started
        # CPU seconds of the reading process and of the (joined) workers: who bounds the speed on idle cores.
        cpu_split = {"reader_cpu_s": cpu(resource.RUSAGE_SELF) - main0,
                     "workers_cpu_s": cpu(resource.RUSAGE_CHILDREN) - workers0}
        rows = len(prepared.train_rows) + len(prepared.val_rows)
        tokens = sum(f["tokens"] for f in prepared.summary["files"])
        cache = cache_bytes(prepared)
        return {"seconds": seconds, "rows": rows, "tokens": tokens, "cache_bytes": cache, **cpu_split}
    return {"seconds": seconds, "rows": rows, "tokens": tokens, "cache_bytes": cache}


def real_tokens(rows) -> int:
    """Non-pad tokens of an old-pipeline Arrow dataset, counted in Arrow (no Python lists)."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(rows.data.column("position_ids"))
    return int(pc.sum(pc.greater_equal(flat, 0)).as_py() or 0)


def load_old_pipeline():
    """glmkit/data.py as it was at OLD_COMMIT, imported under another name."""
    import importlib.util

    path = os.path.join(WORK, "old_data.py")
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:glmkit/data.py"], cwd=benchlib.REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location("old_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_data"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def measure(kind: str, data: str, scratch: str, workers: int, label: str) -> dict:
    result_path = os.path.join(WORK, f"result-{os.getpid()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--data", data, "--scratch", scratch,
           "--workers", str(workers), "--result", result_path]
    env = {**os.environ, "PYTHONPATH": benchlib.REPO_ROOT, "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeSampler([proc.pid]) as sampler:
        output, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{output[-3000:]}")
    with open(result_path, encoding="utf-8") as fh:
        result = json.load(fh)
    result.update(label=label, kind=kind, workers=workers, process_seconds=time.time() - started,
                  peak_anon_gb=sampler.peak_total * 1024 / 1e9)
    result["tokens_per_sec"] = result["tokens"] / result["seconds"]
    result["bytes_per_token"] = result["cache_bytes"] / max(result["tokens"], 1)
    print(f"  {label}: {result['seconds']:.1f} s ({result['process_seconds']:.1f} s with start-up), "
          f"{result['tokens_per_sec'] / 1e6:.2f} M tokens/s, peak anon {result['peak_anon_gb']:.2f} GB, "
          f"cache {result['bytes_per_token']:.2f} B/token", flush=True)
    return result


def two_ranks(data: str, scratch: str) -> dict:
    """Two processes prepare one cold cache at once (two ranks of a run): peaks of each tree."""
    shutil.rmtree(scratch, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": benchlib.REPO_ROOT, "TOKENIZERS_PARALLELISM": "false"}
    procs, results = [], []
    for rank in range(2):
        result_path = os.path.join(WORK, f"rank{rank}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "new", "--data", data, "--scratch", scratch,
               "--workers", "2", "--result", result_path]
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                      result_path))
    with TreeSampler([p.pid for p, _ in procs]) as sampler:
        outputs = [p.communicate()[0] for p, _ in procs]
    for (proc, path), output in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"two ranks failed:\n{output[-3000:]}")
        with open(path, encoding="utf-8") as fh:
            results.append(json.load(fh))
    tokenized = ["data: tokenized" in out for out in outputs]
    preparer = tokenized.index(True)
    waiter = 1 - preparer
    return {"tokenizing_processes": sum(tokenized),
            "preparer_peak_anon_gb": sampler.peaks[procs[preparer][0].pid] * 1024 / 1e9,
            "waiter_peak_anon_gb": sampler.peaks[procs[waiter][0].pid] * 1024 / 1e9,
            "waiter_waited": "waiting for" in outputs[waiter],
            "seconds": max(r["seconds"] for r in results)}


# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(args)
        with open(args.result, "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        return 0
    info = benchlib.start_tiny_bench(threads=None)
    os.makedirs(WORK, exist_ok=True)
    payload = {"machine": info, "corpora": {}, "runs": []}
    for mib in args.sizes:
        single = os.path.join(WORK, f"single-{mib}.jsonl") if mib <= args.old_max_mib else None
        print(f"corpus {mib} MiB: writing", flush=True)
        corpus = write_corpus(os.path.join(WORK, f"corpus-{mib}"), mib, single)
        payload["corpora"][mib] = corpus
        print(f"corpus {mib} MiB: {corpus['shards']} shards ({corpus['gz_shards']} gzip), {corpus['docs']:,} documents, "
              f"{corpus['bytes_on_disk'] / 2**20:.0f} MiB on disk", flush=True)
        if single:
            scratch = os.path.join(WORK, f"old-cache-{mib}")
            shutil.rmtree(scratch, ignore_errors=True)
            for phase in ("cold", "warm"):
                payload["runs"].append({"mib": mib, "phase": phase,
                                        **measure("old", single, scratch, 1, f"old {mib} MiB {phase}")})
            shutil.rmtree(scratch, ignore_errors=True)
        for workers in ((1, 2) if mib == min(args.sizes) else (2,)):
            scratch = os.path.join(WORK, f"new-cache-{mib}-{workers}")
            shutil.rmtree(scratch, ignore_errors=True)
            for phase in ("cold", "warm"):
                payload["runs"].append({"mib": mib, "phase": phase, **measure(
                    "new", os.path.join(WORK, f"corpus-{mib}"), scratch, workers, f"new {mib} MiB {workers}w {phase}")})
            shutil.rmtree(scratch, ignore_errors=True)
    smallest = min(args.sizes)
    print("two ranks preparing at once", flush=True)
    payload["two_ranks"] = {"mib": smallest, **two_ranks(os.path.join(WORK, f"corpus-{smallest}"),
                                                         os.path.join(WORK, "two-ranks-cache"))}
    print(f"  {payload['two_ranks']}", flush=True)
    shutil.rmtree(os.path.join(WORK, "two-ranks-cache"), ignore_errors=True)
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    benchlib.write_json(args.out, payload)
    print(render(payload))
    return 0


def render(payload: dict) -> str:
    runs = payload["runs"]
    rows = []
    for r in runs:
        cold = r["phase"] == "cold"
        rows.append([r["label"], f"{r['seconds']:.2f}", f"{r['process_seconds']:.1f}",
                     f"{r['tokens_per_sec'] / 1e6:.2f}" if cold else "-", f"{r['peak_anon_gb']:.2f}",
                     f"{r['bytes_per_token']:.2f}", f"{r['tokens']:,}"])
    lines = [benchlib.machine_line(payload["machine"]), "",
             benchlib.table(["run", "prepare s", "process s", "M tokens/s", "peak anon GB (tree)", "cache B/token",
                            "tokens"], rows)]
    two = payload["two_ranks"]
    lines += ["", f"two ranks, {two['mib']} MiB cold: {two['tokenizing_processes']} process tokenized; preparer tree "
                  f"peak {two['preparer_peak_anon_gb']:.2f} GB, waiting rank {two['waiter_peak_anon_gb']:.2f} GB"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
