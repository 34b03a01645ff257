#!/usr/bin/env python3
"""Peak resident memory while loading a mid-size GLM-4.5-Air-architecture checkpoint to 4-bit.

A checkpoint with GLM-4.5-Air's architecture (bench/midmodel.py: by default hidden 1024,
12 layers, 64 experts of 512, about 2.4 GB of bf16 safetensors in per-expert Hub layout) is
written under scratch/bench-mid (git-ignored; deleted afterwards unless --keep), then loaded
each way in a fresh subprocess:

- kit:     `glmkit.model.load.load_model`: skeleton on the meta device, the checkpoint streamed one
           decoder layer at a time, each layer's experts fused and quantized (NF4, double
           quantization) before the next layer is read;
- plain:   `AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`, then every Linear but
           lm_head swapped for a bitsandbytes Linear4bit and the fused experts quantized with
           `replace_parameter_4bit`, the same settings as the kit;
- hf-bnb:  `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`
           (transformers quantizes the Linears while loading, the fused experts stay bf16),
           then the experts quantized with `replace_parameter_4bit` (optional: --methods).

Peak RSS = the process's ru_maxrss once the model is loaded: everything resident, the
interpreter and libraries included (about 0.5 GB after the imports, reported as the
baseline), and file-backed pages too: pages of the memory-mapped safetensors that the process
has read and still maps count although the kernel can drop them at will. So the anonymous
memory (RssAnon, which has to fit in RAM) is also sampled every 5 ms and its peak reported,
and what is resident after the load is split into anonymous + file-backed. Every way ends
with the same quantized model: the audit's byte count and the logits of a fixed input are
compared across ways.

    .venv/bin/python bench/bench_loading.py [--layers 12] [--experts 64] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import benchlib
import midmodel  # noqa: E402

METHODS = ("kit", "plain", "hf-bnb")
DEFAULT_DIR = os.path.join(benchlib.SCRATCH, "bench-mid")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    midmodel.add_size_arguments(p)
    p.add_argument("--model-dir", default=DEFAULT_DIR, help="where to write the checkpoint (git-ignored scratch/)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=1, help="loads per method (fresh process each)")
    p.add_argument("--no-check", action="store_true", help="skip the logits comparison (saves a forward pass each)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the loaders (default 1)")
    p.add_argument("--out", default=benchlib.default_out("loading"))
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Workers (one fresh process per load)
# ---------------------------------------------------------------------------

def _quantize_in_place(model, qcfg, compute_dtype) -> None:
    """Post-hoc: what load_model does while streaming, applied to a fully loaded bf16 model."""
    import bitsandbytes as bnb
    import torch

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not isinstance(module, bnb.nn.Linear4bit) \
                and not name.endswith("lm_head"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=qcfg.double_quant,
                                    quant_type=qcfg.quant_type, device="meta")
            new.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False,
                                           compress_statistics=qcfg.double_quant, quant_type=qcfg.quant_type,
                                           blocksize=qcfg.blocksize, module=new).to("cpu")
            if module.bias is not None:
                new.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
            setattr(parent, child, new)
            del module
    _quantize_experts(model, qcfg)


def _quantize_experts(model, qcfg) -> None:
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    for _, module in list(model.named_modules()):
        for attr in ("gate_up_proj", "down_proj"):
            param = module._parameters.get(attr) if hasattr(module, "_parameters") else None
            if param is not None and param.dim() == 3:
                replace_parameter_4bit(module, attr, compress_statistics=qcfg.double_quant,
                                       quant_type=qcfg.quant_type, blocksize=qcfg.blocksize)


class MemorySampler:
    """Peak anonymous and file-backed resident memory of this process, sampled every few ms.

    ru_maxrss counts every resident page, file-backed ones included: pages of a memory-mapped
    checkpoint that a process has read and still maps show up in it although the kernel can
    drop them at will. RssAnon is the memory that really has to fit in RAM. Linux keeps no
    high-water mark per kind, hence the sampling (a spike shorter than the interval can slip by).
    """

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval, self.peak = interval, {"anon": 0, "file": 0, "total": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict:
        values = {}
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    key, value = line.split(":")
                    values[key] = int(value.split()[0]) * 1024
        return {"anon": values.get("RssAnon", 0), "file": values.get("RssFile", 0) + values.get("RssShmem", 0)}

    def sample(self) -> None:
        now = self.read()
        now["total"] = now["anon"] + now["file"]
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def worker(args) -> dict:
    import resource

    import bitsandbytes  # noqa: F401  (imported before the baseline, like the others)
    import psutil
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from glmkit.model import load as modeling

    cfg = benchlib.tiny_config([f"paths.model_dir={args.model_dir}", "quantization.compute_dtype=bfloat16"])
    q = cfg.quantization
    proc = psutil.Process()
    baseline_rss = proc.memory_info().rss
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    baseline = MemorySampler.read()
    start = time.perf_counter()
    with MemorySampler() as sampler:
        if args.worker == "kit":
            model = modeling.load_model(cfg)
        elif args.worker == "plain":
            model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
            _quantize_in_place(model, q, torch.bfloat16)
        else:
            bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                            bnb_4bit_use_double_quant=q.double_quant,
                                            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"])
            model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16,
                                                         quantization_config=bnb_config, device_map="cpu")
            _quantize_experts(model, q)
    load_seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_after = proc.memory_info().rss
    after = MemorySampler.read()
    audit = modeling.audit_model(model)
    result = {"method": args.worker, "load_seconds": load_seconds, "baseline_rss_bytes": baseline_rss,
              "baseline_maxrss_bytes": baseline_maxrss, "peak_rss_bytes": peak, "rss_after_load_bytes": rss_after,
              "baseline_anon_bytes": baseline["anon"], "peak_anon_bytes": sampler.peak["anon"],
              "peak_file_bytes": sampler.peak["file"], "anon_after_load_bytes": after["anon"],
              "file_after_load_bytes": after["file"],
              "audit_bytes_total": audit["bytes_total"],
              "unquantized_expert_params": audit["unquantized_expert_params"],
              "unquantized_linear_params": audit["unquantized_linear_params"], "params_total": audit["params_total"]}
    if not args.no_check:
        import bitsandbytes as bnb

        model.eval()
        for module in model.modules():
            # bitsandbytes repacks CPU layers for an avx512-bf16 kernel in eval mode; the kit turns
            # that off (glmkit/model/load.py), so do the same here: one kernel, comparable logits.
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        torch.save(logits, f"{args.result}.logits.pt")
    return result


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

def run_worker(method: str, args, index: int) -> dict:
    result_path = os.path.join(os.path.dirname(os.path.abspath(args.model_dir)), f"bench-loading-{method}-{index}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--result", result_path,
           "--model-dir", args.model_dir, "--threads", str(args.threads)]
    if args.no_check:
        cmd.append("--no-check")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=benchlib.REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + proc.stderr[-4000:]).strip()
        print(f"  {method}: FAILED (exit {proc.returncode})\n{tail}", file=sys.stderr)
        return {"method": method, "error": tail.splitlines()[-1] if tail else f"exit {proc.returncode}"}
    with open(result_path, encoding="utf-8") as fh:
        result = json.load(fh)
    os.remove(result_path)
    result["process_seconds"] = time.perf_counter() - started
    result["_logits"] = f"{result_path}.logits.pt" if not args.no_check else None
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    args.model_dir = os.path.abspath(args.model_dir)  # the kit resolves relative paths against configs/
    benchlib.quiet()
    if args.worker:
        benchlib.set_threads(args.threads)
        result = worker(args)
        with open(args.result, "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        return 0

    import torch

    info = benchlib.machine_info()
    sizes = midmodel.sizes_from(args)
    existed = os.path.isdir(args.model_dir)
    print(f"writing the mid-size checkpoint to {args.model_dir} ...", flush=True)
    t0 = time.perf_counter()
    description = midmodel.write_mid_checkpoint(args.model_dir, **sizes)
    print(f"  {description['params']['total'] / 1e9:.2f} B parameters, {description['safetensors_bytes'] / 1e9:.2f} GB "
          f"of bf16 safetensors ({time.perf_counter() - t0:.0f} s{', reused' if existed else ''})", flush=True)

    runs = {m: [] for m in args.methods}
    for rep in range(args.repeats):
        order = args.methods if rep % 2 == 0 else list(reversed(args.methods))
        for method in order:
            r = run_worker(method, args, rep)
            runs[method].append(r)
            if "error" not in r:
                print(f"  {method:<7} peak RSS {r['peak_rss_bytes'] / 1e9:6.2f} GB (after imports "
                      f"{r['baseline_rss_bytes'] / 1e9:.2f} GB), peak anonymous {r['peak_anon_bytes'] / 1e9:.2f} GB, "
                      f"load {r['load_seconds']:.0f} s", flush=True)

    logits = {}
    for method, rs in runs.items():
        for r in rs:
            path = r.pop("_logits", None)
            if path and os.path.isfile(path):
                logits.setdefault(method, torch.load(path))
                os.remove(path)
    reference = logits.get("kit")
    methods = {}
    for method, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            methods[method] = {"error": rs[0]["error"]}
            continue
        peak = benchlib.median([r["peak_rss_bytes"] for r in ok])
        base = benchlib.median([r["baseline_rss_bytes"] for r in ok])
        methods[method] = {
            "peak_rss_bytes": peak, "baseline_rss_bytes": base, "peak_minus_baseline_bytes": peak - base,
            "rss_after_load_bytes": benchlib.median([r["rss_after_load_bytes"] for r in ok]),
            "peak_anon_bytes": benchlib.median([r["peak_anon_bytes"] for r in ok]),
            "peak_anon_minus_baseline_bytes": benchlib.median([r["peak_anon_bytes"] - r["baseline_anon_bytes"]
                                                               for r in ok]),
            "peak_file_bytes": benchlib.median([r["peak_file_bytes"] for r in ok]),
            "anon_after_load_bytes": benchlib.median([r["anon_after_load_bytes"] for r in ok]),
            "file_after_load_bytes": benchlib.median([r["file_after_load_bytes"] for r in ok]),
            "load_seconds": benchlib.median([r["load_seconds"] for r in ok]),
            "audit_bytes_total": ok[0]["audit_bytes_total"],
            "unquantized_expert_params": ok[0]["unquantized_expert_params"],
            "unquantized_linear_params": ok[0]["unquantized_linear_params"],
            "runs": ok,
        }
        if reference is not None and method in logits:
            methods[method]["max_abs_logit_diff_vs_kit"] = float((logits[method] - reference).abs().max())
    if "kit" in methods and "peak_rss_bytes" in methods["kit"]:
        for m in methods.values():
            if "peak_rss_bytes" in m:
                m["peak_over_kit"] = m["peak_rss_bytes"] / methods["kit"]["peak_rss_bytes"]
                m["own_peak_over_kit"] = m["peak_minus_baseline_bytes"] / methods["kit"]["peak_minus_baseline_bytes"]
                m["peak_anon_over_kit"] = m["peak_anon_bytes"] / methods["kit"]["peak_anon_bytes"]

    payload = {
        "benchmark": "loading",
        "command": "python bench/bench_loading.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**info, "torch_threads": args.threads},
        "checkpoint": {"path": os.path.relpath(args.model_dir, benchlib.REPO_ROOT), **description},
        "methods": methods,
    }
    print()
    print(benchlib.machine_line(payload["machine"]))
    print(render(payload))
    benchlib.write_json(args.out, payload)
    if not args.keep:
        shutil.rmtree(args.model_dir, ignore_errors=True)
        print(f"deleted {args.model_dir} (--keep to keep it)")
    return 0


def render(payload: dict) -> str:
    labels = {"kit": "kit: glmkit.model.load.load_model (streaming)",
              "plain": "plain: from_pretrained(bf16), then quantize",
              "hf-bnb": "from_pretrained(BitsAndBytesConfig), then experts"}
    rows = []
    for method, m in payload["methods"].items():
        if "error" in m:
            rows.append([labels[method], "failed", "", "", "", "", "", m["error"][:60]])
            continue
        diff = m.get("max_abs_logit_diff_vs_kit")
        rows.append([labels[method], f"{m['peak_rss_bytes'] / 1e9:.2f}", f"{m.get('peak_over_kit', float('nan')):.2f}x",
                     f"{m['peak_anon_bytes'] / 1e9:.2f}", f"{m.get('peak_anon_over_kit', float('nan')):.2f}x",
                     f"{m['anon_after_load_bytes'] / 1e9:.2f} + {m['file_after_load_bytes'] / 1e9:.2f}",
                     f"{m['load_seconds']:.0f}", "-" if diff is None else f"{diff:.1e}"])
    c = payload["checkpoint"]
    head = (f"checkpoint: {c['params']['total'] / 1e9:.2f} B parameters "
            f"({c['params']['routed_experts'] / 1e9:.2f} B in routed experts), "
            f"{c['safetensors_bytes'] / 1e9:.2f} GB bf16 safetensors")
    return head + "\n" + benchlib.table(
        ["load", "peak RSS GB (ru_maxrss)", "vs kit", "peak anonymous GB", "vs kit",
         "after load: anon + file GB", "load s", "max |logit diff| vs kit"], rows, align="lrrrrrrr")


if __name__ == "__main__":
    sys.exit(main())
