#!/usr/bin/env python3
"""Data efficiency: packing vs padding to the longest row vs padding to max_length.

For each max_seq_length, the demo corpus (real prose with a natural spread of lengths) is
turned into rows by the kit's own pipeline (`glmkit.data.tokenize_split`, the collator of
`glmkit.data.make_collator`), in a seeded random order as the training loader would draw it:

- packing     documents end to end in rows of exactly max_seq_length, block-diagonal mask
              (the kit's default);
- longest     one document per row, truncated to max_seq_length, each micro-batch padded
              to its longest row (training.packing=false, training.padding=longest);
- max_length  one document per row, every row padded to max_seq_length (the original recipe).

Reported per mode:
- the share of compute on real tokens = real tokens / positions computed, over a whole epoch;
- the tokens truncation throws away (padding modes cut documents at max_seq_length);
- real tokens per second (wall clock, and per CPU-second of the process, which a shared
  machine's other load disturbs less): forward + backward of the tiny QLoRA model (the kit's load_model +
  prepare_for_training, gradient checkpointing as configured) over the same number of
  micro-batches per mode, picked at evenly spaced quantiles of padded length so the sample
  is representative; repetitions interleave the modes and the median is reported.

    .venv/bin/python bench/bench_data_efficiency.py [--seq-lens 1024 4096] [--batches 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (puts the repository root on sys.path)

MODES = ("packing", "longest", "max_length")
TARGET_SHARE = 0.97


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096], help="max_seq_length values")
    p.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch (default: configs/tiny.yaml's 2)")
    p.add_argument("--batches", type=int, default=3, help="micro-batches timed per mode and length")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timing repetitions (median reported)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seed", type=int, default=1234, help="row order (the loader's shuffle)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two threads stall on each other)")
    p.add_argument("--no-timing", action="store_true", help="only the token accounting, no model")
    p.add_argument("--out", default=benchlib.default_out("data_efficiency"))
    return p.parse_args(argv)


def mode_overrides(mode: str, seq_len: int) -> list[str]:
    over = [f"training.max_seq_length={seq_len}"]
    if mode == "packing":
        over.append("training.packing=true")
    else:
        over += ["training.packing=false", f"training.padding={mode}"]
    return over


# ---------------------------------------------------------------------------
# Rows and micro-batches, as the kit builds them
# ---------------------------------------------------------------------------

def build_rows(cfg, tokenizer, docs, cache_dir):
    from glmkit import data

    rows = data.tokenize_split(docs, tokenizer, cfg, cache_dir, "bench")
    return [dict(r) for r in rows]


def micro_batches(rows, micro_batch: int, seed: int) -> list[list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [[rows[i] for i in order[s:s + micro_batch]] for s in range(0, len(order), micro_batch)]


def batch_accounting(batch: list[dict], mode: str, seq_len: int) -> dict:
    """Positions computed, real tokens and loss targets of one micro-batch, without collating.

    The same numbers the collator's tensors give (checked on the timed batches)."""
    if mode == "packing":
        positions = len(batch) * seq_len
        real = sum(sum(1 for p in r["position_ids"] if p >= 0) for r in batch)
        targets = sum(sum(1 for p in r["position_ids"] if p > 0) for r in batch)
    else:
        length = seq_len if mode == "max_length" else max(len(r["input_ids"]) for r in batch)
        positions = len(batch) * length
        real = sum(len(r["input_ids"]) for r in batch)
        targets = sum(len(r["input_ids"]) - 1 for r in batch)
    return {"positions": positions, "real": real, "targets": targets}


def collated_accounting(batch: dict) -> dict:
    from glmkit.training import target_tokens

    return {"positions": batch["input_ids"].numel(), "real": int(batch["token_mask"].sum()),
            "targets": target_tokens(batch)}


def representative_sample(batches: list[list[dict]], accounting: list[dict], k: int) -> list[int]:
    """Indices of k batches at evenly spaced quantiles of positions computed (then of real tokens)."""
    order = sorted(range(len(batches)), key=lambda i: (accounting[i]["positions"], accounting[i]["real"], i))
    k = min(k, len(order))
    return [order[min(len(order) - 1, int((j + 0.5) * len(order) / k))] for j in range(k)]


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def fwd_bwd_seconds(model, batches) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for forward + backward over the batches."""
    from glmkit.training import loss_sum

    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        loss = loss_sum(model, batch)
        (loss / max(1, int(batch["token_mask"].sum()))).backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.zero_grad(set_to_none=True)
    return wall, cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.quiet()
    benchlib.set_threads(args.threads)
    benchlib.ensure_tiny_assets()
    import torch
    from transformers import AutoTokenizer

    from glmkit import data
    from glmkit import model as modeling

    info = benchlib.machine_info()
    base_cfg = benchlib.tiny_config()
    tokenizer = AutoTokenizer.from_pretrained(base_cfg.paths.model_dir)
    corpus = data.load_corpus(base_cfg)
    docs = corpus.train_docs
    doc_lengths = [len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]  # + EOS
    corpus_tokens = sum(doc_lengths)
    print(f"corpus: {len(docs)} training documents, {corpus_tokens:,} tokens (with EOS), "
          f"median {int(benchlib.median(doc_lengths))}, max {max(doc_lengths)}")

    model = None
    if not args.no_timing:
        torch.manual_seed(base_cfg.training.seed)
        model = modeling.prepare_for_training(modeling.load_model(base_cfg), base_cfg)
        model.train()

    results = []
    with tempfile.TemporaryDirectory(dir=_scratch()) as cache_dir:
        for seq_len in args.seq_lens:
            per_mode = {}
            for mode in args.modes:
                cfg = benchlib.tiny_config(mode_overrides(mode, seq_len))
                rows = build_rows(cfg, tokenizer, docs, os.path.join(cache_dir, f"{mode}-{seq_len}"))
                batches = micro_batches(rows, args.micro_batch, args.seed)
                acc = [batch_accounting(b, mode, seq_len) for b in batches]
                totals = {k: sum(a[k] for a in acc) for k in ("positions", "real", "targets")}
                sample = representative_sample(batches, acc, args.batches)
                collator = data.make_collator(tokenizer, cfg)
                collated = [collator(batches[i]) for i in sample]
                for i, batch in zip(sample, collated):  # the accounting is the collator's, exactly
                    assert collated_accounting(batch) == acc[i], (mode, seq_len, collated_accounting(batch), acc[i])
                sample_totals = {k: sum(acc[i][k] for i in sample) for k in ("positions", "real", "targets")}
                per_mode[mode] = {
                    "rows": len(rows), "micro_batches": len(batches),
                    "positions": totals["positions"], "real_tokens": totals["real"],
                    "target_tokens": totals["targets"],
                    "real_share": totals["real"] / totals["positions"],
                    "truncated_tokens": corpus_tokens - totals["real"],
                    "kept_share": totals["real"] / corpus_tokens,
                    "timed_batches": sample, "timed_positions": sample_totals["positions"],
                    "timed_real_tokens": sample_totals["real"],
                    "timed_real_share": sample_totals["real"] / sample_totals["positions"],
                    "_collated": collated, "seconds": [], "cpu_seconds": [],
                }
            if model is not None:
                # One untimed warm-up pass (first-call allocations), then interleaved repetitions.
                fwd_bwd_seconds(model, per_mode[args.modes[0]]["_collated"][:1])
                for rep in range(args.repeats):
                    order = args.modes[rep % len(args.modes):] + args.modes[:rep % len(args.modes)]
                    for mode in order:
                        seconds, cpu = fwd_bwd_seconds(model, per_mode[mode]["_collated"])
                        per_mode[mode]["seconds"].append(seconds)
                        per_mode[mode]["cpu_seconds"].append(cpu)
                        print(f"  L={seq_len} rep {rep + 1}/{args.repeats} {mode:<10} {seconds:7.2f} s wall "
                              f"{cpu:7.2f} s CPU for {len(per_mode[mode]['_collated'])} micro-batches", flush=True)
            for mode, r in per_mode.items():
                del r["_collated"]
                if r["seconds"]:
                    tps = [r["timed_real_tokens"] / s for s in r["seconds"]]
                    r["real_tokens_per_sec"] = benchlib.summary(tps)
                    r["positions_per_sec"] = benchlib.summary([r["timed_positions"] / s for s in r["seconds"]])
                    r["real_tokens_per_cpu_sec"] = benchlib.summary([r["timed_real_tokens"] / s for s in r["cpu_seconds"]])
            if "packing" in per_mode and per_mode["packing"]["seconds"]:
                base = per_mode["packing"]
                for mode, r in per_mode.items():
                    # Ratio per repetition (paired: same moment of machine load), then the median.
                    ratios = [(r["timed_real_tokens"] / s) / (base["timed_real_tokens"] / b)
                              for s, b in zip(r["seconds"], base["seconds"])]
                    r["tokens_per_sec_vs_packing"] = benchlib.median(ratios)
                    cpu_ratios = [(r["timed_real_tokens"] / s) / (base["timed_real_tokens"] / b)
                                  for s, b in zip(r["cpu_seconds"], base["cpu_seconds"])]
                    r["tokens_per_cpu_sec_vs_packing"] = benchlib.median(cpu_ratios)
            results.append({"max_seq_length": seq_len, "modes": per_mode})

    packing_ok = all(r["modes"]["packing"]["real_share"] >= TARGET_SHARE for r in results if "packing" in r["modes"])
    payload = {
        "benchmark": "data_efficiency",
        "command": "python bench/bench_data_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "settings": {"micro_batch": args.micro_batch, "threads": args.threads, "timed_batches": args.batches, "repeats": args.repeats,
                     "seed": args.seed, "model": base_cfg.paths.model_dir,
                     "gradient_checkpointing": base_cfg.memory.gradient_checkpointing,
                     "compute_dtype": base_cfg.quantization.compute_dtype,
                     "attn_implementation": base_cfg.model.attn_implementation},
        "corpus": {"documents": len(docs), "tokens": corpus_tokens,
                   "median_doc_tokens": benchlib.median(doc_lengths), "max_doc_tokens": max(doc_lengths),
                   "docs_longer_than": {str(L): sum(1 for n in doc_lengths if n > L) for L in args.seq_lens}},
        "results": results,
        "target": {"packing_real_share_at_least": TARGET_SHARE, "met": packing_ok},
    }
    print()
    print(benchlib.machine_line(info))
    print(render(payload))
    benchlib.write_json(args.out, payload)
    return 0


def render(payload: dict) -> str:
    rows = []
    for r in payload["results"]:
        for mode, m in r["modes"].items():
            tps = m.get("real_tokens_per_sec", {}).get("median")
            cps = m.get("real_tokens_per_cpu_sec", {}).get("median")
            rows.append([r["max_seq_length"], mode, f"{m['real_share'] * 100:.1f}%",
                         f"{m['truncated_tokens']:,} ({(1 - m['kept_share']) * 100:.1f}%)",
                         f"{m['micro_batches']:,}",
                         "-" if tps is None or math.isnan(tps) else f"{tps:,.0f}",
                         "-" if "tokens_per_sec_vs_packing" not in m else f"{m['tokens_per_sec_vs_packing']:.2f}x",
                         "-" if cps is None or math.isnan(cps) else f"{cps:,.0f}",
                         "-" if "tokens_per_cpu_sec_vs_packing" not in m else f"{m['tokens_per_cpu_sec_vs_packing']:.2f}x"])
    return benchlib.table(["max_seq_length", "mode", "real tokens / positions", "tokens cut by truncation",
                           "micro-batches per epoch", "real tokens/s wall (median)", "vs packing",
                           "real tokens per CPU-s (median)", "vs packing"],
                          rows, align="llrrrrrrr")


def _scratch() -> str:
    path = os.path.join(benchlib.SCRATCH, "bench")
    os.makedirs(path, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
