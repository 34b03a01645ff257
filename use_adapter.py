#!/usr/bin/env python3
"""Use a trained adapter with the base model named in the config.

    python use_adapter.py --config training_config.yaml --merge merged-model/       # base + LoRA -> one checkpoint, shard by shard
        # (an adapter trained with mtp.train also folds into the MTP layer, which the servers draft with)
    python use_adapter.py --config training_config.yaml --sample "The quick brown"   # greedy continuation
    python use_adapter.py --config training_config.yaml --chat "Hello"   # a reply through the chat template
    python use_adapter.py --config training_config.yaml --chat "Hello" --no-adapter   # the base model's reply
    python use_adapter.py --config training_config.yaml --export-serving serve-adapter/
        # the adapter as vLLM / SGLang load it: routed-expert LoRA per expert (gate/up/down), no merge

--adapter defaults to paths.best_adapter_dir; any checkpoint-<step>/ folder works too.
"""

from __future__ import annotations

import argparse
import os
import sys

from glmkit.config.cli import add_config_arguments, config_from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--adapter", help="adapter folder (default: paths.best_adapter_dir)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--merge", metavar="OUT_DIR", help="write base + adapter merged, as a transformers checkpoint")
    action.add_argument("--sample", metavar="TEXT", help="generate a continuation of TEXT")
    action.add_argument("--chat", metavar="MESSAGE",
                        help="reply to MESSAGE as the chat model: rendered with the model's chat template, the "
                             "prompt echoed before the reply")
    action.add_argument("--export-serving", metavar="OUT_DIR",
                        help="write the adapter in the per-expert LoRA layout vLLM and SGLang serve (no merge)")
    parser.add_argument("--system", metavar="TEXT", help="--chat: a system message before MESSAGE")
    parser.add_argument("--no-adapter", action="store_true", help="--chat: the base model alone, for comparison")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="--merge: dtype of the merged weights (fp32 tensors of the base stay fp32); "
                             "--sample / --chat: dtype the base is loaded in; --export-serving keeps the adapter's dtype")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)

    import torch

    from glmkit.model import adapter
    from glmkit.model.errors import ModelLoadError
    from glmkit.model.load import is_demo_model
    from glmkit.model.serving_export import ServingExportError, export_for_serving
    from glmkit.run.writes import WriteFailed

    adapter_dir = args.adapter or cfg.paths.best_adapter_dir
    dtype = getattr(torch, args.dtype)
    try:
        if args.merge:
            def progress(done, total, shard):
                print(f"  shard {done}/{total}: {shard}", flush=True)

            out = adapter.merge(cfg.paths.model_dir, adapter_dir, args.merge, dtype, progress=progress)
            print(f"merged {adapter_dir} into {cfg.paths.model_dir}: {out}")
        elif args.export_serving:
            done = export_for_serving(cfg.paths.model_dir, adapter_dir, args.export_serving, cfg.source_path)
            print(f"exported {adapter_dir} for serving: {done['out_dir']} ({done['layout']}, rank {done['rank']}; "
                  f"the servers' class: {done['architecture']}); {os.path.join(done['out_dir'], 'README.md')} has "
                  f"the vLLM and SGLang commands")
            if done["mtp_lora_left_out"]:
                print("the adapter's MTP-layer LoRA is not in the export (servers apply LoRA to the main model only); "
                      "--merge serves it: see the export's README")
        elif args.chat is not None:
            prompt, reply = adapter.chat(cfg.paths.model_dir, None if args.no_adapter else adapter_dir, args.chat,
                                         args.system, args.max_new_tokens, dtype)
            print(prompt + reply)
        else:
            continuation = adapter.sample(cfg.paths.model_dir, adapter_dir, args.sample, args.max_new_tokens, dtype)
            print(f"prompt:       {args.sample}")
            print(f"continuation: {continuation}")
        if (args.sample is not None or args.chat is not None) and is_demo_model(cfg.paths.model_dir):
            print(f"note: {cfg.paths.model_dir} is the tiny CPU demo model (random weights, a few minutes of "
                  f"training): its output is noise by design")
    except (adapter.MergeError, adapter.ChatTemplateMissing, ServingExportError, ModelLoadError, WriteFailed,
            FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
