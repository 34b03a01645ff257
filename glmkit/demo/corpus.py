"""A demo corpus of real prose: the Python standard library's documentation, frozen in the repository.

Module, class and function documentation give a natural spread of lengths: one-line function docs of
a few dozen tokens up to class references of several thousand. The 1,169 documents were rendered once
with pydoc from CPython 3.11.7's standard library (memory addresses and the interpreter's path taken
out, each cut at 24,000 characters) and are committed compressed beside this file, 234 KB.

They used to be rendered at demo time. pydoc's pages depend on the interpreter that renders them (its
version and build, and what the process happened to import), so the corpus, the tiny tokenizer trained
on it and every loss the test suite pins moved from one machine to another. Read from this file they
are the same everywhere: tests/test_train.py checks their hash before it compares a loss.
"""

from __future__ import annotations

import filecmp
import json
import lzma
import os
import sys

FROZEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.jsonl.xz")


def iter_documents(max_docs: int | None = None):
    """Yield the corpus documents in their fixed order (the first `max_docs` of them)."""
    with lzma.open(FROZEN, "rt", encoding="utf-8") as fh:
        for count, line in enumerate(fh):
            if max_docs is not None and count >= max_docs:
                return
            yield json.loads(line)["text"]


def write_demo_corpus(path: str, max_docs: int | None = None, text_field: str = "text") -> tuple[int, bool]:
    """Write the corpus as JSONL (one {"text": ...} per line) atomically: (the number of docs, whether the file
    changed). A file that already holds these bytes is left as it is, so its token store stays valid (a rewrite
    would give it a new modification time, and the next run would tokenize it again)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    count = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in iter_documents(max_docs):
            fh.write(json.dumps({text_field: doc}, ensure_ascii=False) + "\n")
            count += 1
    if os.path.isfile(path) and filecmp.cmp(tmp, path, shallow=False):
        os.remove(tmp)
        return count, False
    os.replace(tmp, path)
    return count, True


def main(argv=None) -> int:
    import argparse

    from glmkit.config.cli import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(description="Write the demo corpus to paths.data_path of a config.")
    add_config_arguments(parser)
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    target = cfg.paths.data_path
    if not isinstance(target, str) or not target.endswith(".jsonl") or os.path.isdir(target):
        print(f"error: paths.data_path must name one .jsonl file to write the demo corpus to, got {target!r}",
              file=sys.stderr)
        return 2
    count, changed = write_demo_corpus(cfg.paths.data_path, args.max_docs, cfg.training.text_field)
    print(f"wrote {count} documents to {cfg.paths.data_path}" if changed else
          f"{cfg.paths.data_path} already holds the {count} demo documents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
