#!/usr/bin/env python3
"""Preparing chat data against text at the same bytes: throughput, peak memory, bytes per token.

Two corpora of the same JSONL size are generated under scratch/bench-chat (git-ignored) from the
demo corpus's prose: text documents, and conversations in the kit's chat format made from the
same prose by glmkit/demo/chat_corpus.py (a single exchange, a follow-up, thinking, a tool call),
each made unique. Both are prepared by `glmkit.data.prepare.prepare_data` with the tiny model's
tokenizer and chat template, in a fresh subprocess per run, cold cache each time:

- text: tokenize (the Rust tokenizer, batched), write tokens.u32 / lengths / digests;
- chat: parse and check every message, render each conversation with the chat template, tokenize,
        read the trained positions off the role markers, write tokens.u32 and trained.bits too.

Measured: wall time of the preparation, input MiB per second and tokens per second (end to end:
reading, tokenizing, writing, laying out rows), the same per CPU second of the reader and its workers
(which a busy shared machine moves far less than wall time), the peak anonymous memory of the process tree
(bench_data_prep.TreeSampler: the reader plus its tokenizer workers), and the cache's bytes per
token. Medians of `--repeats` runs, text and chat interleaved; the chat / text wall-clock ratio is the
median of per-pair ratios. The sizes show whether memory stays flat as the corpus grows.

    .venv/bin/python bench/bench_chat_prep.py [--sizes 16 64] [--repeats 3] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

import benchlib
from bench_data_prep import TreeSampler

WORK = os.path.join(benchlib.SCRATCH, "bench-chat")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64], help="corpus sizes in MiB of JSONL")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="tokenizer workers (1: per-core throughput)")
    p.add_argument("--out", default=benchlib.default_out("chat_prep"))
    p.add_argument("--worker", choices=["text", "chat"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_corpora(mib: int) -> dict:
    """text-<mib>.jsonl and chat-<mib>.jsonl of about `mib` MiB each, from the same prose."""
    from glmkit.demo.chat_corpus import conversation

    folder = os.path.join(WORK, f"corpora-{mib}")
    done = os.path.join(folder, "DONE")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as fh:
            return json.load(fh)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(os.path.join(benchlib.REPO_ROOT, "data", "demo.jsonl"), encoding="utf-8") as fh:
        prose = [json.loads(line)["text"] for line in fh]
    info = {"mib": mib}
    for kind in ("text", "chat"):
        rng, target, size, count = random.Random(mib), mib * 2**20, 0, 0
        path = os.path.join(folder, f"{kind}.jsonl")
        with open(path, "w", encoding="utf-8") as out:
            while size < target:
                a = rng.choice(prose)
                text = f"Document {count}.\n" + a[rng.randrange(len(a) // 2):]  # unique: no duplicate digests
                # the whole text as the answer: a conversation about as long as the text document
                record = {"text": text} if kind == "text" else conversation(text, count, answer_chars=None)
                line = json.dumps(record, ensure_ascii=False) + "\n"
                out.write(line)
                size += len(line.encode())
                count += 1
        info[kind] = {"path": path, "bytes": size, "records": count}
    with open(done, "w", encoding="utf-8") as fh:
        json.dump(info, fh)
    return info


def worker(args) -> dict:
    import resource

    benchlib.quiet()
    from transformers import AutoTokenizer

    from glmkit.data.prepare import cache_bytes, prepare_data

    source = args.data if args.worker == "text" else f"[{{path: '{args.data}', format: chat}}]"
    cfg = benchlib.tiny_config([f"paths.data_path={source}", f"paths.scratch_dir={args.scratch}",
                                f"performance.tokenizer_workers={args.workers}", "training.max_seq_length=4096",
                                "training.val_fraction=0.01"])
    tokenizer = AutoTokenizer.from_pretrained(cfg.paths.model_dir)
    cpu = lambda who: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(who))  # noqa: E731
    reader0, workers0, started = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.time()
    prepared = prepare_data(cfg, tokenizer, show_progress=False)
    seconds = time.time() - started
    # CPU seconds of the reading process and of its (joined) tokenizer workers: what a busy machine barely moves
    cpu_seconds = cpu(resource.RUSAGE_SELF) - reader0 + cpu(resource.RUSAGE_CHILDREN) - workers0
    files = prepared.summary["files"]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": sum(f["tokens"] for f in files),
            "cache_bytes": cache_bytes(prepared),
            "trained_tokens": sum(s["trained_tokens"] for s in prepared.summary["sources"]),
            "documents": sum(f["docs"] for f in files)}


def measure(kind: str, data: str, workers: int, label: str) -> dict:
    scratch = os.path.join(WORK, "cache")
    shutil.rmtree(scratch, ignore_errors=True)
    result_path = os.path.join(WORK, f"result-{os.getpid()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--data", data, "--scratch", scratch,
           "--workers", str(workers), "--result", result_path]
    env = {**os.environ, "PYTHONPATH": benchlib.REPO_ROOT, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeSampler([proc.pid]) as sampler:
        output, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{output[-3000:]}")
    with open(result_path, encoding="utf-8") as fh:
        result = json.load(fh)
    shutil.rmtree(scratch, ignore_errors=True)
    result["peak_anon_mb"] = sampler.peak_total * 1024 / 1e6
    print(f"  {label}: {result['seconds']:.1f} s ({result['cpu_seconds']:.1f} CPU s), "
          f"{result['tokens'] / result['seconds'] / 1e3:.0f} k tokens/s, "
          f"peak anon {result['peak_anon_mb']:.0f} MB, cache {result['cache_bytes'] / result['tokens']:.3f} B/token",
          flush=True)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(args)
        with open(args.result, "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        return 0
    info = benchlib.start_tiny_bench(threads=None)
    os.makedirs(WORK, exist_ok=True)
    payload = {"machine": info, "workers": args.workers, "repeats": args.repeats, "sizes": {}}
    for mib in args.sizes:
        corpora = write_corpora(mib)
        entry = {"corpora": corpora}
        for repeat in range(args.repeats):  # interleaved: a load change on the shared machine hits both kinds
            for kind in ("text", "chat"):
                run = measure(kind, corpora[kind]["path"], args.workers, f"{kind} {mib} MiB #{repeat + 1}")
                entry.setdefault(kind, []).append(run)
        for kind in ("text", "chat"):
            runs = entry[kind]
            entry[f"{kind}_median"] = {
                "seconds": benchlib.median([r["seconds"] for r in runs]),
                "cpu_seconds": benchlib.median([r["cpu_seconds"] for r in runs]),
                "mib_per_s": benchlib.median([corpora[kind]["bytes"] / 2**20 / r["seconds"] for r in runs]),
                "mib_per_cpu_s": benchlib.median([corpora[kind]["bytes"] / 2**20 / r["cpu_seconds"] for r in runs]),
                "tokens_per_s": benchlib.median([r["tokens"] / r["seconds"] for r in runs]),
                "peak_anon_mb": benchlib.median([r["peak_anon_mb"] for r in runs]),
                "bytes_per_token": runs[0]["cache_bytes"] / runs[0]["tokens"],
                "tokens": runs[0]["tokens"], "trained_tokens": runs[0]["trained_tokens"]}
        # paired: run i of chat against run i of text (interleaved, so they saw the same load), then the median
        pairs = zip(entry["chat"], entry["text"], strict=True)
        entry["chat_over_text_mib_per_s"] = benchlib.median([
            (corpora["chat"]["bytes"] / c["seconds"]) / (corpora["text"]["bytes"] / t["seconds"]) for c, t in pairs])
        entry["chat_over_text_mib_per_cpu_s"] = entry["chat_median"]["mib_per_cpu_s"] / entry["text_median"]["mib_per_cpu_s"]
        payload["sizes"][mib] = entry
    shutil.rmtree(WORK, ignore_errors=True)
    benchlib.write_json(args.out, payload)
    print(render(payload))
    return 0


def render(payload: dict) -> str:
    rows = []
    for mib, entry in payload["sizes"].items():
        for kind in ("text", "chat"):
            m = entry[f"{kind}_median"]
            rows.append([f"{kind}, {mib} MiB", f"{m['seconds']:.1f}", f"{m['cpu_seconds']:.1f}", f"{m['mib_per_s']:.2f}",
                         f"{m['mib_per_cpu_s']:.2f}", f"{m['tokens_per_s'] / 1e3:.0f}", f"{m['peak_anon_mb']:.0f}",
                         f"{m['bytes_per_token']:.3f}", f"{m['tokens']:,}", f"{m['trained_tokens']:,}"])
        rows.append([f"chat / text, {mib} MiB", "", "", f"{entry['chat_over_text_mib_per_s']:.2f}x",
                     f"{entry['chat_over_text_mib_per_cpu_s']:.2f}x", "", "", "", "", ""])
    return "\n".join([benchlib.machine_line(payload["machine"]),
                      f"{payload['workers']} tokenizer worker(s), median of {payload['repeats']} cold runs", "",
                      benchlib.table(["corpus", "prepare s", "CPU s", "MiB/s", "MiB/CPU s", "k tokens/s",
                                      "peak anon MB (tree)", "cache B/token", "tokens", "trained tokens"], rows)])


if __name__ == "__main__":
    sys.exit(main())
