#!/usr/bin/env python3
"""MTP drift: does continued pre-training slow speculative decoding, and does `mtp.train` keep it up?

An experiment, not a timing, on the tiny model through the real commands (train_qlora.py, use_adapter.py):

1. Pre-training stand-in. The tiny model's trunk and MTP layer are trained together (LoRA on every Linear,
   `mtp.train: true`) on the demo corpus of prose (Python's documentation), then merged into a new base
   model (`use_adapter.py --merge`): a model whose MTP layer is in step with its trunk, its acceptance
   meaningful (the issue asks for above 30%).
2. Continued pre-training of that model on a different corpus, the same modules' source code, twice from
   the same seed: without `mtp.train` (the trunk's LoRA only; the MTP layer as it was) and with it (the
   MTP layer's LoRA trained beside, `mtp.loss_weight` 0.3, `grad_to_trunk` false).

Every eval measures both sets, the code's held-out split (`val`) and the prose (`prose`, an eval set): the
MTP layer's speculative acceptance (the share of its drafts greedy speculative decoding with one draft token
accepts) and the trunk's loss. Reported: acceptance before CPT (step 0), after CPT without mtp.train, after
CPT with it, and the trunk's eval loss in both cases.

    .venv/bin/python bench/bench_mtp_drift.py [--pretrain-steps 400] [--cpt-steps 200]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import time

import benchlib
import yaml

CODE_MODULES = ("argparse", "ast", "asyncio.base_events", "calendar", "collections", "configparser", "csv",
                "dataclasses", "datetime", "difflib", "email.message", "enum", "fractions", "functools", "gettext",
                "gzip", "http.client", "http.server", "imaplib", "inspect", "ipaddress", "json.decoder", "locale",
                "logging", "logging.handlers", "mailbox", "optparse", "pathlib", "pickle", "pprint", "queue",
                "random", "shlex", "shutil", "smtplib", "socketserver", "statistics", "string", "subprocess",
                "tarfile", "tempfile", "textwrap", "threading", "tokenize", "trace", "traceback", "typing",
                "unittest.case", "urllib.parse", "urllib.request", "uuid", "zipfile")
CHUNK_CHARS = 6_000
PROSE_EVAL_DOCS = 80  # the demo corpus's last documents: held out of pre-training, the CPT runs' `prose` eval set


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=400, help="steps of the pre-training stand-in")
    p.add_argument("--cpt-steps", type=int, default=200, help="steps of continued pre-training, each way")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--work", default=os.path.join(benchlib.SCRATCH, "bench-mtp-drift"),
                   help="folder for the corpora, models and runs (emptied first)")
    p.add_argument("--out", default=benchlib.default_out("mtp_drift"))
    return p.parse_args(argv)


def write_code_corpus(path: str) -> int:
    """The CODE_MODULES' source, cut at blank lines into documents of up to CHUNK_CHARS: the other corpus."""
    import importlib

    docs = []
    for name in CODE_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        while source.strip():
            cut = source.rfind("\n\n", 0, CHUNK_CHARS) if len(source) > CHUNK_CHARS else len(source)
            cut = cut if cut > CHUNK_CHARS // 4 else min(len(source), CHUNK_CHARS)
            docs.append(source[:cut].strip())
            source = source[cut:]
    with open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            if len(doc) >= 200:
                fh.write(json.dumps({"text": doc}) + "\n")
    return len(docs)


def split_prose(corpus: str, train_path: str, eval_path: str) -> tuple[int, int]:
    """The demo corpus without its last PROSE_EVAL_DOCS documents (pre-training), and those (the prose eval set)."""
    with open(corpus, encoding="utf-8") as fh:
        lines = fh.readlines()
    with open(train_path, "w", encoding="utf-8") as fh:
        fh.writelines(lines[:-PROSE_EVAL_DOCS])
    with open(eval_path, "w", encoding="utf-8") as fh:
        fh.writelines(lines[-PROSE_EVAL_DOCS:])
    return len(lines) - PROSE_EVAL_DOCS, PROSE_EVAL_DOCS


def write_config(folder: str, model_dir: str, data: str, overrides: dict) -> str:
    with open(benchlib.TINY_CONFIG, encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    config["paths"].update(model_dir=model_dir, data_path=data, output_dir=os.path.join(folder, "run"),
                           best_adapter_dir=os.path.join(folder, "best"), scratch_dir=os.path.join(folder, "scratch"))
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        config[section][key] = value
    path = os.path.join(folder, "config.yaml")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh)
    return path


def run(*args) -> float:
    started = time.monotonic()
    result = subprocess.run([sys.executable, *args], cwd=benchlib.REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def evals(folder: str) -> dict[int, dict]:
    with open(os.path.join(folder, "run", "logs", "eval_log.jsonl"), encoding="utf-8") as fh:
        return {r["step"]: r for r in map(json.loads, fh)}


def main(argv=None) -> int:
    args = parse_args(argv)
    info = benchlib.start_tiny_bench(None)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    prose, prose_eval = os.path.join(args.work, "prose.jsonl"), os.path.join(args.work, "prose-eval.jsonl")
    split_prose(os.path.join(benchlib.REPO_ROOT, "data", "demo.jsonl"), prose, prose_eval)
    code = os.path.join(args.work, "code.jsonl")
    code_docs = write_code_corpus(code)
    tiny = os.path.join(benchlib.REPO_ROOT, "models", "tiny-glm4-moe")
    common = {"lora.dropout": 0.0, "optimization.micro_batch_per_gpu": 4, "optimization.grad_accum_steps": 1,
              "optimization.warmup_steps": 10, "logging.eval_interval": args.eval_interval,
              "checkpoint.interval": args.eval_interval, "checkpoint.keep_top_k": 1,
              "logging.expert_stats_interval": 1000}

    # 1. the pre-training stand-in: trunk and MTP layer trained together on prose, then merged into a new base
    pre = os.path.join(args.work, "pretrain")
    config = write_config(pre, tiny, prose, {**common, "training.max_steps": args.pretrain_steps, "mtp.train": True,
                                             "lora.r": 32, "lora.alpha": 32, "lora.target_modules": ["all-linear"],
                                             "optimization.learning_rate": 3e-3})
    seconds = {"pretrain": run("train_qlora.py", "--config", config)}
    base = os.path.join(args.work, "pretrained-model")
    seconds["merge"] = run("use_adapter.py", "--config", config, "--adapter",
                           os.path.join(pre, "run", f"final-checkpoint-{args.pretrain_steps}"), "--merge", base)
    pretrain = evals(pre)

    # 2. continued pre-training on code, without and with mtp.train
    arms = {}
    for name, train_mtp in (("without", False), ("with", True)):
        folder = os.path.join(args.work, f"cpt-{name}-mtp-train")
        config = write_config(folder, base, code, {
            **common, "training.max_steps": args.cpt_steps, "mtp.train": train_mtp,
            "eval.sets": [{"name": "prose", "path": prose_eval}], "training.val_fraction": 0.05})
        seconds[f"cpt_{name}"] = run("train_qlora.py", "--config", config)
        arms[name] = evals(folder)

    last = args.cpt_steps
    rows, results = [], {}
    for eval_set in ("val", "prose"):
        before = arms["without"][0]
        assert before[f"{eval_set}/mtp_acceptance"] == arms["with"][0][f"{eval_set}/mtp_acceptance"]
        result = {
            "acceptance_before": before[f"{eval_set}/mtp_acceptance"],
            "acceptance_after_without": arms["without"][last][f"{eval_set}/mtp_acceptance"],
            "acceptance_after_with": arms["with"][last][f"{eval_set}/mtp_acceptance"],
            "mtp_loss_before": before[f"{eval_set}/mtp_loss"],
            "mtp_loss_after_without": arms["without"][last][f"{eval_set}/mtp_loss"],
            "mtp_loss_after_with": arms["with"][last][f"{eval_set}/mtp_loss"],
            "trunk_loss_before": before[f"{eval_set}/loss"],
            "trunk_loss_after_without": arms["without"][last][f"{eval_set}/loss"],
            "trunk_loss_after_with": arms["with"][last][f"{eval_set}/loss"],
            "curve_without": {s: r[f"{eval_set}/mtp_acceptance"] for s, r in arms["without"].items()},
            "curve_with": {s: r[f"{eval_set}/mtp_acceptance"] for s, r in arms["with"].items()},
        }
        results[eval_set] = result
        label = "code (CPT corpus, held out)" if eval_set == "val" else "prose (pre-training corpus)"
        rows.append([label, benchlib.fmt_pct(result["acceptance_before"]),
                     benchlib.fmt_pct(result["acceptance_after_without"]),
                     benchlib.fmt_pct(result["acceptance_after_with"]),
                     f"{result['trunk_loss_before']:.3f}", f"{result['trunk_loss_after_without']:.3f}",
                     f"{result['trunk_loss_after_with']:.3f}"])
    pre_accept = {s: r["val/mtp_acceptance"] for s, r in pretrain.items()}
    print(f"\npre-training stand-in on prose ({args.pretrain_steps} steps): acceptance on its held-out prose "
          + ", ".join(f"step {s} {benchlib.fmt_pct(a)}" for s, a in sorted(pre_accept.items())))
    print(f"continued pre-training on code ({code_docs} documents, {args.cpt_steps} steps each way)\n")
    print(benchlib.table(["eval set", "acceptance before CPT", "after, without mtp.train", "after, with mtp.train",
                          "trunk loss before", "after, without", "after, with"], rows))
    print("\n" + benchlib.machine_line(info))
    benchlib.write_json(args.out, {"machine": info, "args": vars(args), "code_documents": code_docs,
                                   "pretrain_acceptance": pre_accept, "results": results, "seconds": seconds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
