"""Peak memory and time of `--prepare-data` on a JSONL whose one line is a huge document (issue 25).

Writes `scratch/bench-long/long.jsonl`: a few ordinary demo documents and one document of `--mib` MiB
(demo prose joined, so the tokenizer sees ordinary text), then runs `train_qlora.py --config C
--prepare-data` in a fresh process with one tokenizer worker, sampling every 50 ms the resident memory
(VmRSS) of the preparer and of its pool worker. Reported: the peak of each process, the peak of their sum,
the largest single process by getrusage(RUSAGE_CHILDREN).ru_maxrss, the wall time and the token count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import benchlib
import yaml


def write_long_corpus(path: str, mib: int) -> int:
    with open(os.path.join(benchlib.REPO_ROOT, "data", "demo.jsonl"), encoding="utf-8") as fh:
        prose = [json.loads(line)["text"] for line in fh]
    parts, size = [], 0
    while size < mib * 2**20:
        for text in prose:
            parts.append(text)
            size += len(text) + 2
    long_text = "\n\n".join(parts)[: mib * 2**20]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for text in prose[:3] + [long_text] + prose[3:6]:
            fh.write(json.dumps({"text": text}) + "\n")
    return len(long_text)


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample(root: int, peaks: dict, stop: threading.Event) -> None:
    import psutil

    while not stop.is_set():
        try:
            children = [c.pid for c in psutil.Process(root).children(recursive=True)]
        except psutil.Error:
            children = []
        parent = rss_kib(root)
        workers = [rss_kib(pid) for pid in children]
        peaks["preparer"] = max(peaks["preparer"], parent)
        peaks["worker"] = max([peaks["worker"], *workers])
        peaks["tree"] = max(peaks["tree"], parent + sum(workers))
        stop.wait(0.05)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=50, help="size of the long document in MiB of characters")
    parser.add_argument("--label", default="current", help="name of this run in the results file")
    parser.add_argument("--out", default=benchlib.default_out("long_document"))
    args = parser.parse_args(argv)
    benchlib.ensure_tiny_assets()
    folder = os.path.join(benchlib.REPO_ROOT, "scratch", "bench-long")
    shutil.rmtree(os.path.join(folder, "scratch"), ignore_errors=True)
    chars = write_long_corpus(os.path.join(folder, "long.jsonl"), args.mib)
    with open(benchlib.TINY_CONFIG, encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    config["paths"].update(model_dir=os.path.join(benchlib.REPO_ROOT, "models", "tiny-glm4-moe"),
                           data_path=os.path.join(folder, "long.jsonl"), output_dir=os.path.join(folder, "run"),
                           best_adapter_dir=os.path.join(folder, "best"), scratch_dir=os.path.join(folder, "scratch"))
    config["performance"]["tokenizer_workers"] = 1
    config["training"]["val_fraction"] = 0  # a handful of documents: a validation split would be refused
    config_path = os.path.join(folder, "config.yaml")
    with open(config_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh)

    peaks, stop = {"preparer": 0, "worker": 0, "tree": 0}, threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "train_qlora.py", "--config", config_path, "--prepare-data"],
                               cwd=benchlib.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = threading.Thread(target=sample, args=(process.pid, peaks, stop), daemon=True)
    sampler.start()
    output = process.communicate()[0]
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        print(output)
        return process.returncode
    with open(os.path.join(folder, "scratch", "tokenized", "files", os.listdir(
            os.path.join(folder, "scratch", "tokenized", "files"))[0], "meta.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    result = {"label": args.label, "long_document_chars": chars, "seconds": round(seconds, 2),
              "peak_rss_gb": {k: round(v / 2**20, 3) for k, v in peaks.items()},
              "ru_maxrss_children_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
              "docs": meta["docs"], "tokens": meta["tokens"]}
    print(json.dumps(result))
    previous = {}
    if os.path.isfile(args.out):
        with open(args.out, encoding="utf-8") as fh:
            previous = json.load(fh)
    previous.setdefault("runs", {})[args.label] = result
    previous["machine"] = benchlib.machine_info()
    benchlib.write_json(args.out, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
