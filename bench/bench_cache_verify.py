#!/usr/bin/env python3
"""What the cache's self-check costs on a warm start (issue 25): `token_store.damage` and `cache.rows_damage`.

A warm start verifies every token store it reuses (file sizes against meta.json, the lengths' sum, BLAKE2b of
lengths.u32 and digests.b16: 20 bytes a document) and the run's rows (their layouts against summary.json and
the stores). The cost grows with documents and pieces, not with tokens: tokens.u32 is checked by size only.

Synthetic stores are written with the kit's own writer (`token_store._StoreWriter`, as a preparation writes
them) under scratch/bench-cache-verify; tokens.u32 is a sparse file of the right size, since only its size
is read. Documents have 256 tokens on average (lognormal); rows are packed at 4096 tokens with
`rows.pack_layout`, as the trainer lays them out. Each check is timed --repeats times (median), the page
cache warm, as on a restart.

    .venv/bin/python bench/bench_cache_verify.py [--docs 1000000 4000000] [--repeats 5] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import benchlib  # first: it puts the repository root on sys.path
import numpy as np

from glmkit.data import cache, token_store
from glmkit.data.rows import pack_layout, save_layout
from glmkit.data.sources import InputFile

WORK = os.path.join(benchlib.SCRATCH, "bench-cache-verify")
SEQ = 4096


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, nargs="+", default=[1_000_000, 4_000_000], help="documents per store")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    p.add_argument("--out", default=benchlib.default_out("cache_verify"))
    return p.parse_args(argv)


def write_store(folder: str, docs: int) -> tuple[str, int]:
    """A store of `docs` documents written by the kit's writer, in blocks; tokens.u32 left sparse."""
    rng = np.random.default_rng(0)
    path = os.path.join(folder, "files", f"store-{docs}")
    item = InputFile(os.path.join(folder, f"corpus-{docs}.jsonl"), 0, 0, "jsonl")
    writer = token_store._StoreWriter(path, item, "text")
    block, written = 1 << 20, 0
    while written < docs:
        n = min(block, docs - written)
        lengths = np.maximum(rng.lognormal(5.3, 0.6, n), 2).astype(np.uint32)
        digests = rng.bytes(16 * n)
        # The writer's own add(), minus the tokens: those are appended as a sparse extent below.
        writer.files["lengths.u32"].write(lengths.tobytes())
        writer.files["digests.b16"].write(digests)
        writer.lengths_hash.update(lengths.tobytes())
        writer.digests_hash.update(digests)
        writer.docs += n
        writer.tokens += int(lengths.sum(dtype=np.int64))
        written += n
    writer.files["tokens.u32"].truncate(4 * writer.tokens)
    writer.finish()
    return path, writer.tokens


def write_rows(folder: str, store: str, tokens: int) -> str:
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
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        assert fn() is None
        times.append(time.perf_counter() - started)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    info = benchlib.machine_info()
    shutil.rmtree(WORK, ignore_errors=True)
    results = []
    for docs in args.docs:
        store, tokens = write_store(WORK, docs)
        rows_dir = write_rows(WORK, store, tokens)
        pieces = len(np.load(os.path.join(rows_dir, "train.piece_len.npy"), mmap_mode="r"))
        store_s = timed(lambda: token_store.damage(store), args.repeats)  # noqa: B023
        rows_s = timed(lambda: cache.rows_damage(rows_dir, [tokens]), args.repeats)  # noqa: B023
        results.append({"docs": docs, "tokens": tokens, "pieces": pieces,
                        "checked_bytes": os.path.getsize(os.path.join(store, "lengths.u32"))
                        + os.path.getsize(os.path.join(store, "digests.b16")),
                        "store_s": benchlib.summary(store_s), "rows_s": benchlib.summary(rows_s),
                        "raw": {"store_s": store_s, "rows_s": rows_s}})
    rows = [[f"{r['docs']:,}", f"{r['tokens'] / 1e6:,.0f} M", f"{r['pieces']:,}",
             f"{r['checked_bytes'] / 2**20:,.0f}", f"{r['store_s']['median']:.3f}", f"{r['rows_s']['median']:.3f}",
             f"{1e9 * (r['store_s']['median'] + r['rows_s']['median']) / r['docs']:.0f}"] for r in results]
    print(benchlib.machine_line(info))
    print(benchlib.table(["documents", "tokens", "pieces", "hashed MiB", "store check s", "rows check s",
                          "ns / document"], rows))
    benchlib.write_json(args.out, {"command": " ".join(sys.argv), "machine": info, "results": results})
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
