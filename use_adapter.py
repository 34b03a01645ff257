#!/usr/bin/env python3
"""Use a trained adapter with the base model named in the config.

    python use_adapter.py --config training_config.yaml --merge merged-model/       # base + LoRA -> one checkpoint, shard by shard
    python use_adapter.py --config training_config.yaml --sample "The quick brown"   # greedy continuation

--adapter defaults to paths.best_adapter_dir; any checkpoint-<step>/ folder works too.
"""

from __future__ import annotations

import argparse
import sys

from glmkit.config.schema import add_config_arguments, config_from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--adapter", help="adapter folder (default: paths.best_adapter_dir)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--merge", metavar="OUT_DIR", help="write base + adapter merged, as a transformers checkpoint")
    action.add_argument("--sample", metavar="TEXT", help="generate a continuation of TEXT")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="--merge: dtype of the merged weights (fp32 tensors of the base stay fp32); "
                             "--sample: dtype the base is loaded in")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)

    import torch

    from glmkit.model import adapter
    from glmkit.model.errors import ModelLoadError
    from glmkit.run.writes import WriteFailed

    adapter_dir = args.adapter or cfg.paths.best_adapter_dir
    dtype = getattr(torch, args.dtype)
    try:
        if args.merge:
            def progress(done, total, shard):
                print(f"  shard {done}/{total}: {shard}", flush=True)

            out = adapter.merge(cfg.paths.model_dir, adapter_dir, args.merge, dtype, progress=progress)
            print(f"merged {adapter_dir} into {cfg.paths.model_dir}: {out}")
        else:
            print(adapter.sample(cfg.paths.model_dir, adapter_dir, args.sample, args.max_new_tokens, dtype))
    except (adapter.MergeError, ModelLoadError, WriteFailed, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
