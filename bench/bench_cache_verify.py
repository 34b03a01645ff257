#!/usr/bin/env python3
"""What the cache's self-check costs on a warm start (issues 25 and 32): `token_store.damage` and `cache.rows_damage`,
and a whole cached restart of a 1 GiB corpus, `train_qlora.py --prepare-data` on a warm cache.

A warm start verifies every token store it reuses (file sizes against meta.json, the lengths' sum, BLAKE2b of
lengths.u32 and digests.b16: 20 bytes a document; since issue 32 also a CRC-32 of every 64 MiB block of
tokens.u32, read on every core) and the run's rows (their layouts against summary.json and the stores).

Part 1, the checks alone: synthetic stores written with the kit's own writer (`token_store._StoreWriter.add`, as
a preparation writes them: random token ids, lognormal lengths averaging about 240 tokens), rows packed at 4096
tokens with `rows.pack_layout`. Each check is timed --repeats times (median) with the page cache warm, as on a
restart; "size only" is the same store with meta.json's tokens checksum removed, which is the check before issue
32 (a store written then is checked that way still).

Part 2 (--restart-gib N): a real corpus of N GiB of JSONL (the frozen demo corpus' documents, numbered so each
is unique, in 8 shards), prepared once cold with the tiny tokenizer, then `train_qlora.py --prepare-data` run
--repeats times on the warm cache, each a new process as a restart is; and, in one process, `prepare_data` (the
trainer's data step) and the store checks alone, --repeats times. --baseline-repo PATH runs the same in another
checkout (e.g. `git archive` of the commit before), with its own cache, for old beside new. --keep leaves the
corpus and caches; --reuse times them again without the cold preparations.

    .venv/bin/python bench/bench_cache_verify.py [--docs 250000 1000000] [--repeats 5] [--keep]
    .venv/bin/python bench/bench_cache_verify.py --docs --restart-gib 1 --baseline-repo /tmp/before [--keep] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import benchlib  # first: it puts the repository root on sys.path
import numpy as np
import yaml

from glmkit.data import cache, token_store
from glmkit.data.rows import pack_layout, save_layout
from glmkit.data.sources import InputFile

WORK = os.path.join(benchlib.SCRATCH, "bench-cache-verify")
SEQ = 4096
SHARDS = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, nargs="*", default=[250_000, 1_000_000], help="documents per store")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--restart-gib", type=float, default=None, help="also time a cached restart of a corpus this big")
    p.add_argument("--baseline-repo", default=None, help="with --restart-gib: another checkout to time the same way")
    p.add_argument("--keep", action="store_true", help="keep the synthetic stores, the corpus and its caches")
    p.add_argument("--reuse", action="store_true", help="--restart-gib: time the corpus and caches --keep left")
    p.add_argument("--out", default=benchlib.default_out("cache_verify"))
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Part 1: the checks alone
# ---------------------------------------------------------------------------

def write_store(folder: str, docs: int) -> tuple[str, int]:
    """A store of `docs` documents of random ids written by the kit's writer, in blocks."""
    rng = np.random.default_rng(0)
    path = os.path.join(folder, "files", f"store-{docs}")
    item = InputFile(os.path.join(folder, f"corpus-{docs}.jsonl"), 0, 0, "jsonl")
    writer = token_store._StoreWriter(path, item, "text")
    block, written = 1 << 18, 0
    while written < docs:
        n = min(block, docs - written)
        lengths = np.maximum(rng.lognormal(5.3, 0.6, n), 2).astype(np.uint32)
        flat = rng.integers(0, 151_552, int(lengths.sum(dtype=np.int64)), dtype=np.uint32)
        writer.add((flat, lengths, rng.bytes(16 * n), []), written + 1, n)
        written += n
    writer.finish()
    return path, writer.tokens


def size_only_twin(store: str) -> str:
    """The same files (hard links) with meta.json as stores were written before issue 32: no tokens checksum."""
    twin = f"{store}-size-only"
    os.makedirs(twin)
    for name in ("tokens.u32", "lengths.u32", "digests.b16"):
        os.link(os.path.join(store, name), os.path.join(twin, name))
    meta = token_store.Store.open(store).meta
    meta.pop("tokens_crc32")
    with open(os.path.join(twin, "meta.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh)
    return twin


def write_rows(folder: str, store: str) -> str:
    lengths = token_store.Store.open(store).lengths().astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    rows_dir = os.path.join(folder, "rows", os.path.basename(store))
    os.makedirs(rows_dir, exist_ok=True)
    summary = {"files": [{"store": store}]}
    for name, ids in (("train", np.arange(len(lengths))), ("val", np.arange(0))):
        layout = pack_layout(starts[ids], lengths[ids], SEQ, True)
        save_layout(rows_dir, name, layout)
        summary[name] = {"rows": len(layout[0]) - 1, "tokens": int(layout[2].sum(dtype=np.int64))}
    with open(os.path.join(rows_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh)
    return rows_dir


def timed(fn, repeats: int) -> list[float]:
    fn()  # once untimed: the page cache warm, as on a restart right after a run
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        assert fn() is None
        times.append(time.perf_counter() - started)
    return times


def checks(docs_list: list[int], repeats: int) -> list[dict]:
    results = []
    for docs in docs_list:
        store, tokens = write_store(WORK, docs)
        twin = size_only_twin(store)
        rows_dir = write_rows(WORK, store)
        new_s = timed(lambda: token_store.damage(store), repeats)  # noqa: B023
        old_s = timed(lambda: token_store.damage(twin), repeats)  # noqa: B023
        rows_s = timed(lambda: cache.rows_damage(rows_dir, [tokens]), repeats)  # noqa: B023
        results.append({"docs": docs, "tokens": tokens, "tokens_bytes": 4 * tokens,
                        "size_only_s": benchlib.summary(old_s), "with_crc_s": benchlib.summary(new_s),
                        "rows_s": benchlib.summary(rows_s), "raw": {"size_only_s": old_s, "with_crc_s": new_s,
                                                                    "rows_s": rows_s}})
        shutil.rmtree(os.path.join(WORK, "files"), ignore_errors=True)
        shutil.rmtree(os.path.join(WORK, "rows"), ignore_errors=True)
    return results


# ---------------------------------------------------------------------------
# Part 2: a cached restart of a real corpus
# ---------------------------------------------------------------------------

def write_corpus(folder: str, gib: float) -> str:
    """N GiB of JSONL in SHARDS shards: the frozen corpus' documents again and again, each numbered (unique)."""
    from glmkit.demo.corpus import iter_documents

    docs = list(iter_documents())
    target, written, number = int(gib * 2**30), 0, 0
    os.makedirs(folder, exist_ok=True)
    handles = [open(os.path.join(folder, f"part-{i:02d}.jsonl"), "w", encoding="utf-8") for i in range(SHARDS)]
    try:
        while written < target:
            line = json.dumps({"text": f"[{number}] {docs[number % len(docs)]}"}, ensure_ascii=False) + "\n"
            handles[number % SHARDS].write(line)
            written += len(line.encode())
            number += 1
    finally:
        for fh in handles:
            fh.close()
    return folder


def restart_config(repo: str, name: str, model_dir: str, corpus: str) -> str:
    with open(os.path.join(repo, "configs", "tiny.yaml"), encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    run = os.path.join(WORK, name)
    data["paths"].update(model_dir=model_dir, data_path=corpus, output_dir=os.path.join(run, "run"),
                         best_adapter_dir=os.path.join(run, "best"), scratch_dir=os.path.join(run, "scratch"))
    data["training"]["max_seq_length"] = SEQ
    os.makedirs(run, exist_ok=True)
    path = os.path.join(run, "config.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh)
    return path


# The trainer's data step in one process of `repo`, on a warm cache: prepare_data, then the store checks alone.
IN_PROCESS = r"""
import json, sys, time
from glmkit.config.schema import load_config
from glmkit.data import prepare, token_store
cfg = load_config(sys.argv[1])
tokenizer = prepare.load_tokenizer(cfg)
found = {"prepare_s": [], "store_check_s": []}
for _ in range(int(sys.argv[2])):
    started = time.perf_counter()
    prepared = prepare.prepare_data(cfg, tokenizer, show_progress=False)
    found["prepare_s"].append(time.perf_counter() - started)
    assert not prepared.prepared_here
    started = time.perf_counter()
    assert all(token_store.damage(f["store"]) is None for f in prepared.summary["files"])
    found["store_check_s"].append(time.perf_counter() - started)
print(json.dumps(found))
"""


def prepare_once(repo: str, config: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": repo, "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "train_qlora.py", "--config", config, "--prepare-data"], cwd=repo, env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"--prepare-data failed in {repo}: {done.stderr[-2000:]}")
    return elapsed, done.stdout + done.stderr


def restart(repo: str, name: str, model_dir: str, corpus: str, repeats: int, reuse: bool) -> dict:
    config = restart_config(repo, name, model_dir, corpus)
    cold = None if reuse else prepare_once(repo, config)[0]
    warm = []
    for _ in range(repeats):
        seconds, output = prepare_once(repo, config)
        assert "(the cache was warm)" in output, output[-2000:]
        warm.append(seconds)
    done = subprocess.run([sys.executable, "-c", IN_PROCESS, config, str(repeats)], cwd=repo, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": repo, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"the in-process timing failed in {repo}: {done.stderr[-2000:]}")
    in_process = json.loads(done.stdout.strip().splitlines()[-1])
    store_bytes = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in
                      os.walk(os.path.join(WORK, name, "scratch", "tokenized", "files")) for f in files
                      if f == "tokens.u32")
    return {"repo": repo, "cold_s": cold, "warm_s": benchlib.summary(warm), "tokens_u32_bytes": store_bytes,
            "prepare_s": benchlib.summary(in_process["prepare_s"]),
            "store_check_s": benchlib.summary(in_process["store_check_s"]),
            "raw": {"warm_s": warm, **in_process}, "loadavg_after": list(os.getloadavg())}


def main(argv=None) -> int:
    args = parse_args(argv)
    info = benchlib.machine_info()
    if not args.reuse:
        shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK, exist_ok=True)
    results = {"command": " ".join(sys.argv), "machine": info, "checks": checks(args.docs, args.repeats)}
    print(benchlib.machine_line(info))
    if results["checks"]:
        print(benchlib.table(
            ["documents", "tokens", "tokens.u32 MiB", "store check s, size only", "store check s, with CRC",
             "ratio", "rows check s"],
            [[f"{r['docs']:,}", f"{r['tokens'] / 1e6:,.0f} M", f"{r['tokens_bytes'] / 2**20:,.0f}",
              f"{r['size_only_s']['median']:.3f}", f"{r['with_crc_s']['median']:.3f}",
              f"{r['with_crc_s']['median'] / r['size_only_s']['median']:.1f}x", f"{r['rows_s']['median']:.3f}"]
             for r in results["checks"]]))
    if args.restart_gib:
        from glmkit.demo.tiny import write_tiny_checkpoint

        model_dir, corpus = os.path.join(WORK, "model"), os.path.join(WORK, "corpus")
        if not args.reuse:
            write_tiny_checkpoint(model_dir, seed=0)
            write_corpus(corpus, args.restart_gib)
        repos = ([("before", os.path.abspath(args.baseline_repo))] if args.baseline_repo else []) + \
            [("this checkout", benchlib.REPO_ROOT)]
        results["restart"] = {label: restart(repo, f"restart-{i}", model_dir, corpus, args.repeats, args.reuse)
                              for i, (label, repo) in enumerate(repos)}
        print(f"\na cached restart of {args.restart_gib:g} GiB of JSONL (medians of {args.repeats})")
        print(benchlib.table(["code", "tokens.u32 MiB", "cold prepare s", "--prepare-data, new process s",
                              "prepare_data in process s", "store checks s"],
                             [[label, f"{r['tokens_u32_bytes'] / 2**20:,.0f}",
                               "reused" if r["cold_s"] is None else f"{r['cold_s']:.0f}",
                               f"{r['warm_s']['median']:.2f}", f"{r['prepare_s']['median']:.2f}",
                               f"{r['store_check_s']['median']:.2f}"] for label, r in results["restart"].items()]))
    benchlib.write_json(args.out, results)
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
