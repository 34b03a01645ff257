#!/usr/bin/env python3
"""Data efficiency: packing vs padding to the longest row vs padding to max_length.

For each max_seq_length, the demo corpus (real prose with a natural spread of lengths) is
turned into rows by the kit's own pipeline (`glmkit.data.prepare.prepare_data`, the collator of
`glmkit.data.rows.make_collator`), in a seeded random order as the training loader would draw it:

- packing     documents end to end in rows of exactly max_seq_length, block-diagonal mask
              (the kit's default);
- longest     one document per row, truncated to max_seq_length, each micro-batch padded
              to its longest row (training.packing=false, training.padding=longest);
- max_length  one document per row, every row padded to max_seq_length (the original recipe).

Reported per mode:
- the share of compute on real tokens = real tokens / positions computed, over a whole epoch,
  and the tokens that truncation throws away (the padding modes cut documents);
- real tokens per second, forward + backward of the tiny QLoRA model (the kit's load_model +
  prepare_for_training, gradient checkpointing as configured), two ways:
  * sampled: the same number of micro-batches per mode, picked at evenly spaced quantiles of
    padded length, timed in interleaved repetitions (median; wall clock and CPU time);
  * epoch: the time of every micro-batch of the epoch predicted by a cost model fitted to all
    the timed micro-batches of that max_seq_length, t = c0 + c1 * positions + c2 * positions *
    row_length (fixed cost, per-token work, attention over the row), then real tokens / sum.
    A few quantile samples miss the rare long rows of `longest`, whose cost grows with the
    square of their length; the projection does not.

    .venv/bin/python bench/bench_data_efficiency.py [--seq-lens 1024 4096] [--batches 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
import time

import benchlib

MODES = ("packing", "longest", "max_length")
TARGET_SHARE = 0.97


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096], help="max_seq_length values")
    p.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch (default: configs/tiny.yaml's 2)")
    p.add_argument("--batches", type=int, default=4, help="micro-batches timed per mode and length")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repetitions (median reported)")
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
    import copy

    from glmkit.data.prepare import prepare_data

    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, "docs.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({cfg.training.text_field: d}) + "\n" for d in docs)
    cfg = copy.deepcopy(cfg)
    cfg.paths.data_path, cfg.paths.scratch_dir, cfg.training.val_fraction = path, cache_dir, 0.0
    rows = prepare_data(cfg, tokenizer, show_progress=False).train_rows
    return [rows[i] for i in range(len(rows))]


def micro_batches(rows, micro_batch: int, seed: int) -> list[list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [[rows[i] for i in order[s:s + micro_batch]] for s in range(0, len(order), micro_batch)]


def batch_accounting(batch: list[dict], mode: str, seq_len: int) -> dict:
    """Positions computed, row length, real tokens and loss targets of one micro-batch.

    Computed from the rows; equal to what the collator's tensors give (checked on the timed ones)."""
    if mode == "packing":
        length = seq_len
        real = sum(sum(1 for p in r["position_ids"] if p >= 0) for r in batch)
        targets = sum(sum(1 for p in r["position_ids"] if p > 0) for r in batch)
    else:
        length = seq_len if mode == "max_length" else max(len(r["input_ids"]) for r in batch)
        real = sum(len(r["input_ids"]) for r in batch)
        targets = sum(len(r["input_ids"]) - 1 for r in batch)
    return {"positions": len(batch) * length, "length": length, "real": real, "targets": targets}


def collated_accounting(batch: dict) -> dict:
    from glmkit.train.step import target_tokens

    return {"positions": batch["input_ids"].numel(), "length": batch["input_ids"].shape[1],
            "real": int(batch["token_mask"].sum()), "targets": target_tokens(batch)}


def representative_sample(accounting: list[dict], k: int) -> list[int]:
    """Indices of k micro-batches at evenly spaced quantiles of positions computed (then real tokens)."""
    order = sorted(range(len(accounting)), key=lambda i: (accounting[i]["positions"], accounting[i]["real"], i))
    k = min(k, len(order))
    return [order[min(len(order) - 1, int((j + 0.5) * len(order) / k))] for j in range(k)]


# ---------------------------------------------------------------------------
# What the same epoch costs GLM-4.5-Air (analytic, FLOPs as in bench/mfu.py)
# ---------------------------------------------------------------------------

def glm45_air_epoch_flops(batches: list[list[dict]], mode: str, seq_len: int) -> dict:
    """Training FLOPs of this epoch's micro-batches for GLM-4.5-Air's shapes (token counts are the
    tiny tokenizer's). Weights: 4 N per position computed, padding included (bench/mfu.py).
    Attention, forward + backward = 3x forward, two kernels:
    - sdpa with the 4-D mask the kit builds (its default): every position attends over the whole
      row, nothing skipped: 4 * layers * heads * head_dim * row_length per position;
    - flash-attention varlen (attn_implementation: flash_attention_2): causal within each
      document segment only: 2 * layers * heads * head_dim * segment_length per token."""
    import mfu

    from glmkit.plan.weights import GLM45_AIR_CONFIG

    p = mfu.active_params(GLM45_AIR_CONFIG)
    per_len = p["layers"] * p["heads"] * p["head_dim"]
    linear = dense = varlen = 0.0
    for batch in batches:
        length = batch_accounting(batch, mode, seq_len)["length"]
        for row in batch:
            linear += 4 * p["active"] * length
            dense += 3 * 4 * per_len * length * length
            if mode == "packing":
                segments, current = [], 0
                for pos in row["position_ids"]:
                    if pos == 0 and current:
                        segments.append(current)
                        current = 0
                    current += 1 if pos >= 0 else 0
                segments.append(current)
            else:
                segments = [len(row["input_ids"])]
            varlen += sum(3 * 2 * per_len * n * n for n in segments if n)
    return {"weights_flops": linear, "attention_sdpa_dense_flops": dense, "attention_varlen_flops": varlen,
            "active_params": p["active"]}


# ---------------------------------------------------------------------------
# Timing and the cost model
# ---------------------------------------------------------------------------

def fwd_bwd_seconds(model, batches) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds of this process) of forward + backward, per micro-batch."""
    from glmkit.train.step import loss_sum

    out = []
    for batch in batches:
        wall, cpu = time.perf_counter(), time.process_time()
        loss = loss_sum(model, batch)
        (loss / max(1, int(batch["token_mask"].sum()))).backward()
        model.zero_grad(set_to_none=True)
        out.append((time.perf_counter() - wall, time.process_time() - cpu))
    return out


def features(acc: dict) -> list[float]:
    return [1.0, float(acc["positions"]), float(acc["positions"]) * acc["length"]]


def fit_cost_model(observations: list[tuple[dict, float]]) -> dict:
    """Least squares t = c0 + c1*positions + c2*positions*length with every c >= 0.

    Tries every subset of the three terms and keeps the best fit whose coefficients are all
    non-negative (three terms: a closed-form non-negative least squares)."""
    import numpy as np

    x = np.array([features(a) for a, _ in observations])
    y = np.array([t for _, t in observations])
    best = None
    for k in (3, 2, 1):
        for subset in itertools.combinations(range(3), k):
            coef, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(3)
            full[list(subset)] = coef
            residual = float(((x @ full - y) ** 2).sum())
            if best is None or residual < best[0] - 1e-15:
                best = (residual, full)
    coef = best[1]
    predicted = x @ coef
    rel = np.abs(predicted - y) / y
    return {"coefficients": {"fixed_s": float(coef[0]), "per_position_s": float(coef[1]),
                             "per_position_x_length_s": float(coef[2])},
            "max_rel_error": float(rel.max()), "median_rel_error": float(np.median(rel)),
            "observations": len(observations)}


def predict(model: dict, acc: dict) -> float:
    c = model["coefficients"]
    f = features(acc)
    return c["fixed_s"] * f[0] + c["per_position_s"] * f[1] + c["per_position_x_length_s"] * f[2]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    info = benchlib.start_tiny_bench(args.threads)
    import torch
    from transformers import AutoTokenizer

    from glmkit.data import rows as data
    from glmkit.model import load as modeling

    info["torch_threads"] = args.threads
    base_cfg = benchlib.tiny_config()
    tokenizer = AutoTokenizer.from_pretrained(base_cfg.paths.model_dir)
    with open(base_cfg.paths.data_path, encoding="utf-8") as fh:
        docs = [json.loads(line)[base_cfg.training.text_field] for line in fh if line.strip()]
    doc_lengths = [len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]  # + EOS
    corpus_tokens = sum(doc_lengths)
    print(f"corpus: {len(docs)} training documents, {corpus_tokens:,} tokens (with EOS), "
          f"median {int(benchlib.median(doc_lengths))}, max {max(doc_lengths)}", flush=True)

    model = None
    if not args.no_timing:
        torch.manual_seed(base_cfg.training.seed)
        model = modeling.prepare_for_training(modeling.load_model(base_cfg), base_cfg)
        model.train()

    results = []
    with tempfile.TemporaryDirectory(dir=_scratch()) as cache_dir:
        for seq_len in args.seq_lens:
            per_mode, epoch_acc = {}, {}
            for mode in args.modes:
                cfg = benchlib.tiny_config(mode_overrides(mode, seq_len))
                rows = build_rows(cfg, tokenizer, docs, os.path.join(cache_dir, f"{mode}-{seq_len}"))
                batches = micro_batches(rows, args.micro_batch, args.seed)
                acc = [batch_accounting(b, mode, seq_len) for b in batches]
                epoch_acc[mode] = acc
                totals = {k: sum(a[k] for a in acc) for k in ("positions", "real", "targets")}
                glm = glm45_air_epoch_flops(batches, mode, seq_len)
                for kernel, key in (("sdpa", "attention_sdpa_dense_flops"), ("varlen", "attention_varlen_flops")):
                    glm[f"gflop_per_real_token_{kernel}"] = (glm["weights_flops"] + glm[key]) / totals["real"] / 1e9
                sample = representative_sample(acc, args.batches)
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
                    "target_share": totals["targets"] / totals["positions"],
                    "truncated_tokens": corpus_tokens - totals["real"],
                    "kept_share": totals["real"] / corpus_tokens,
                    "glm45_air_analytic": glm,
                    "timed_batches": sample, "timed_lengths": [acc[i]["length"] for i in sample],
                    "timed_positions": sample_totals["positions"], "timed_real_tokens": sample_totals["real"],
                    "timed_real_share": sample_totals["real"] / sample_totals["positions"],
                    "_collated": collated, "batch_seconds": [], "batch_cpu_seconds": [],
                }
            if model is not None:
                # One untimed warm-up pass (first-call allocations), then interleaved repetitions.
                fwd_bwd_seconds(model, per_mode[args.modes[0]]["_collated"][:1])
                for rep in range(args.repeats):
                    order = args.modes[rep % len(args.modes):] + args.modes[:rep % len(args.modes)]
                    for mode in order:
                        times = fwd_bwd_seconds(model, per_mode[mode]["_collated"])
                        per_mode[mode]["batch_seconds"].append([w for w, _ in times])
                        per_mode[mode]["batch_cpu_seconds"].append([c for _, c in times])
                        print(f"  L={seq_len} rep {rep + 1}/{args.repeats} {mode:<10} "
                              f"{sum(w for w, _ in times):7.2f} s wall {sum(c for _, c in times):7.2f} s CPU "
                              f"for {len(times)} micro-batches of lengths {per_mode[mode]['timed_lengths']}",
                              flush=True)
            for r in per_mode.values():
                del r["_collated"]
            entry = {"max_seq_length": seq_len, "modes": per_mode}
            if model is not None:
                entry["cost_model"] = summarize_timing(per_mode, epoch_acc)
            results.append(entry)

    packing_ok = all(r["modes"]["packing"]["real_share"] >= TARGET_SHARE for r in results if "packing" in r["modes"])
    payload = {
        "benchmark": "data_efficiency",
        "command": "python bench/bench_data_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "settings": {"micro_batch": args.micro_batch, "threads": args.threads, "timed_batches": args.batches,
                     "repeats": args.repeats, "seed": args.seed,
                     "model": os.path.relpath(base_cfg.paths.model_dir, benchlib.REPO_ROOT),
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


def summarize_timing(per_mode: dict, epoch_acc: dict) -> dict:
    """Sampled throughput per mode (median over repetitions), paired ratios to packing, and the
    epoch projection from a cost model fitted to every timed micro-batch of this length."""
    observations = []
    for mode, r in per_mode.items():
        walls = [sum(rep) for rep in r["batch_seconds"]]
        cpus = [sum(rep) for rep in r["batch_cpu_seconds"]]
        r["sample_seconds"], r["sample_cpu_seconds"] = walls, cpus
        r["real_tokens_per_sec"] = benchlib.summary([r["timed_real_tokens"] / s for s in walls])
        r["real_tokens_per_cpu_sec"] = benchlib.summary([r["timed_real_tokens"] / s for s in cpus])
        accs = [epoch_acc[mode][i] for i in r["timed_batches"]]
        for j, acc in enumerate(accs):
            observations.append((acc, benchlib.median([rep[j] for rep in r["batch_seconds"]])))
    model = fit_cost_model(observations)
    for mode, r in per_mode.items():
        seconds = sum(predict(model, a) for a in epoch_acc[mode])
        r["epoch_projected_seconds"] = seconds
        r["epoch_real_tokens_per_sec"] = r["real_tokens"] / seconds
    if "packing" in per_mode:
        base = per_mode["packing"]
        for r in per_mode.values():
            # Ratio per repetition (paired: same moment of machine load), then the median.
            r["tokens_per_sec_vs_packing"] = benchlib.median(
                [(r["timed_real_tokens"] / s) / (base["timed_real_tokens"] / b)
                 for s, b in zip(r["sample_seconds"], base["sample_seconds"])])
            r["tokens_per_cpu_sec_vs_packing"] = benchlib.median(
                [(r["timed_real_tokens"] / s) / (base["timed_real_tokens"] / b)
                 for s, b in zip(r["sample_cpu_seconds"], base["sample_cpu_seconds"])])
            r["epoch_tokens_per_sec_vs_packing"] = r["epoch_real_tokens_per_sec"] / base["epoch_real_tokens_per_sec"]
    return model


def render(payload: dict) -> str:
    rows = []
    for r in payload["results"]:
        for mode, m in r["modes"].items():
            timed = "real_tokens_per_sec" in m
            rows.append([
                r["max_seq_length"], mode, f"{m['real_share'] * 100:.1f}%",
                f"{m['truncated_tokens']:,} ({(1 - m['kept_share']) * 100:.1f}%)", f"{m['micro_batches']:,}",
                f"{m['real_tokens_per_sec']['median']:,.0f} ({m['tokens_per_sec_vs_packing']:.2f}x)" if timed else "-",
                f"{m['tokens_per_cpu_sec_vs_packing']:.2f}x" if timed else "-",
                (f"{m['epoch_real_tokens_per_sec']:,.0f} ({m['epoch_tokens_per_sec_vs_packing']:.2f}x)"
                 if timed else "-"),
            ])
    out = [benchlib.table(["max_seq_length", "mode", "real tokens / positions", "tokens cut by truncation",
                           "micro-batches / epoch", "sampled real tokens/s (vs packing)", "same, CPU time",
                           "epoch-projected real tokens/s (vs packing)"], rows, align="llrrrrrr")]
    glm_rows = []
    for r in payload["results"]:
        base = r["modes"].get("packing", {}).get("glm45_air_analytic")
        for mode, m in r["modes"].items():
            g = m["glm45_air_analytic"]
            def rel(key, g=g, base=base):
                return f" ({g[key] / base[key]:.2f}x)" if base else ""
            glm_rows.append([r["max_seq_length"], mode,
                             f"{g['gflop_per_real_token_sdpa']:.1f}{rel('gflop_per_real_token_sdpa')}",
                             f"{g['gflop_per_real_token_varlen']:.1f}{rel('gflop_per_real_token_varlen')}"])
    out.append("")
    out.append("GLM-4.5-Air, analytic: training GFLOP per real token of this epoch (lower is better)")
    out.append(benchlib.table(["max_seq_length", "mode", "sdpa + the kit's 4-D mask (default)",
                               "flash-attention varlen"], glm_rows, align="llrr"))
    for r in payload["results"]:
        cm = r.get("cost_model")
        if cm:
            c = cm["coefficients"]
            out.append(f"cost model at {r['max_seq_length']}: {c['fixed_s'] * 1e3:.1f} ms per micro-batch + "
                       f"{c['per_position_s'] * 1e6:.1f} us per position + {c['per_position_x_length_s'] * 1e9:.1f} ns "
                       f"per position x row length; fit error median {cm['median_rel_error'] * 100:.1f}%, "
                       f"max {cm['max_rel_error'] * 100:.1f}% over {cm['observations']} micro-batches")
    return "\n".join(out)


def _scratch() -> str:
    path = os.path.join(benchlib.SCRATCH, "bench")
    os.makedirs(path, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
