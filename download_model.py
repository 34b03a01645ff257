#!/usr/bin/env python
"""Download model.name_or_path (GLM-4.5-Air, GLM-4.5/4.6/4.7, GLM-4.7-Flash) into paths.model_dir and verify it
(or verify / write a tiny test checkpoint).

    python download_model.py                      # download model.name_or_path @ model.revision, then verify
    python download_model.py --verify-only        # re-check an existing paths.model_dir (headers, seconds)
    python download_model.py --verify-only --deep # ... and hash every file against the Hub's sha256
    python download_model.py --tiny --set paths.model_dir=models/tiny   # offline, scaled-down checkpoint
    python download_model.py --tiny glm4.6 --set paths.model_dir=models/tiny-glm46  # ... GLM-4.6-shaped

Rerunning after an interruption fetches only what is still missing. Every request to the Hub gives up after
--timeout seconds without an answer. Exit codes: 0 usable checkpoint, 1 download refused/failed or
verification failed, 2 bad configuration or options, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from glmkit.config.cli import add_config_arguments, config_from_args
from glmkit.hub import download as hub
from glmkit.hub import verify as model_files

# glmkit.demo.tiny.TINY_VARIANTS' names (not imported here: it needs torch, which only --tiny does)
TINY_VARIANT_NAMES = ("air", "glm4.6", "glm4.7", "air-8kv", "glm4.7-flash", "glm4.7-flash-narrow-v")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--verify-only", action="store_true", help="only check the files already in paths.model_dir")
    mode.add_argument("--tiny", nargs="?", const="air", choices=TINY_VARIANT_NAMES, metavar="VARIANT",
                      help="write a scaled-down checkpoint, offline, then verify it: air (GLM-4.5-Air's shape, "
                           "the default), glm4.6 or glm4.7 (GLM-4.6's / GLM-4.7's / GLM-4.5's: QK-norm, three dense "
                           "layers), air-8kv (GLM-4.5-Air's 8 KV heads: distributed.sequence_parallel up to 8), "
                           "glm4.7-flash (GLM-4.7-Flash's: multi-head latent attention), "
                           "glm4.7-flash-narrow-v (the same, v head dim below q/k's); each with its MTP layer")
    parser.add_argument("--min-free-gb", type=float, default=None, metavar="GB",
                        help="require this much free disk space instead of the computed need (0 skips the check)")
    parser.add_argument("--deep", action="store_true",
                        help="also hash every file and compare with the Hub's sha256 (needs the Hub; reads "
                             "every byte: minutes for ~220 GB)")
    parser.add_argument("--timeout", type=_seconds, default=hub.DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"give up on a Hub request after this long without an answer "
                             f"(default {hub.DEFAULT_TIMEOUT:g})")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive, finite number of seconds")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.deep and args.tiny:
        parser.error("--deep compares with the Hub's hashes; a --tiny checkpoint is not on the Hub")
    cfg = config_from_args(args)
    model_dir = cfg.paths.model_dir
    rerun = "download_model.py --tiny" if args.tiny else "download_model.py"
    try:
        if args.tiny:
            write_tiny(model_dir, args.tiny)
        elif not args.verify_only:
            hub.download(cfg.model.name_or_path, cfg.model.revision, model_dir, min_free_gb=args.min_free_gb,
                         timeout=args.timeout)
        return report(model_dir, rerun, cfg if args.deep else None, args.timeout)
    except hub.HubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted; rerun download_model.py to resume (finished files are kept)", file=sys.stderr)
        return 130


def write_tiny(model_dir: str, variant: str = "air") -> None:
    if hub.is_hub_download(model_dir):
        # Mixing a tiny checkpoint into a real download would leave a folder that is neither.
        raise hub.HubError(f"{model_dir} holds a Hub download; point --tiny elsewhere, "
                           "e.g. --set paths.model_dir=models/tiny")
    try:
        from glmkit.demo.tiny import write_tiny_checkpoint  # lazy: only --tiny needs it (and torch)
    except ImportError as exc:
        raise hub.HubError(f"--tiny needs glmkit.demo.tiny.write_tiny_checkpoint, which could not be imported "
                           f"({exc}); update the checkout") from None
    os.makedirs(model_dir, exist_ok=True)
    print(f"writing a tiny {variant}-shaped checkpoint into {model_dir}", flush=True)
    write_tiny_checkpoint(model_dir, seed=0, variant=variant)


def report(model_dir: str, rerun: str, deep_cfg=None, timeout: float = hub.DEFAULT_TIMEOUT) -> int:
    """Verify (and with `deep_cfg`, hash against the Hub), print the footprint, and return the exit code."""
    problems = model_files.verify_model_dir(model_dir, rerun=rerun)
    if deep_cfg is not None and os.path.isdir(model_dir):
        flagged = frozenset(path for path, _ in model_files.check_weights(model_dir))  # reported once, above
        try:
            problems += model_files.deep_verify(model_dir, deep_cfg.model.name_or_path, deep_cfg.model.revision,
                                        timeout=timeout, skip=flagged, rerun=rerun)
        except hub.HubError as exc:
            problems.append(str(exc))
    if os.path.isdir(model_dir):
        files, partial = hub.footprint(model_dir)
        line = f"footprint: {files / hub.GB:.2f} GB ({files:,} bytes) in {model_dir}"
        if partial:
            line += (f" (+{partial / hub.GB:.2f} GB of abandoned *.incomplete files under "
                     f"{hub.HF_LOCAL_CACHE}; delete them when no download is running)")
        print(line)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    how = " (every file's hash matches the Hub's)" if deep_cfg is not None else ""
    print(f"verified: {model_dir} is a complete {model_files.architecture_of(model_dir)} checkpoint{how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
