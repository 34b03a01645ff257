"""A demo corpus of real prose, built offline from the Python standard library's documentation.

Module, class and function documentation give a natural spread of lengths: one-line
function docs of a few dozen tokens up to class references of several thousand. The
corpus is generated at demo time (never committed) and is the same on every run.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pydoc
import re
import sys
import warnings

# Modules that import without side effects (no GUI, no printing) and document themselves well.
MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "binascii", "bisect", "calendar", "cmd",
    "codecs", "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "email.message", "enum", "fnmatch", "fractions", "ftplib",
    "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser",
    "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "locale", "logging", "logging.handlers", "lzma", "mailbox", "math", "mimetypes", "numbers",
    "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "poplib", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace",
    "traceback", "tracemalloc", "types", "typing", "unittest", "urllib.parse", "urllib.request",
    "uuid", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib",
]

# Default values render as "<object object at 0x7f...>": the address changes with every process.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
MIN_CHARS = 120          # shorter docs are stubs ("Return self==value."), not prose
MAX_CHARS = 24_000       # about 6k tokens: long enough to span several packed rows


def _documents_of(module) -> list[str]:
    docs = []
    module_doc = inspect.getdoc(module)
    if module_doc:
        docs.append(f"Module {module.__name__}\n\n{module_doc}")
    for name in sorted(getattr(module, "__all__", None) or dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exports would duplicate another module's docs
        if inspect.isclass(obj):
            docs.append(pydoc.render_doc(obj, title="%s", renderer=pydoc.plaintext))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            doc = inspect.getdoc(obj)
            if doc:
                docs.append(f"{module.__name__}.{name}{_signature(obj)}\n\n{doc}")
    return docs


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _trim(text: str) -> str:
    # Defaults such as platform.architecture(executable=sys.executable) name this checkout's venv.
    text = _ADDRESS.sub("", text).replace(sys.executable, "python").strip()
    if len(text) <= MAX_CHARS:
        return text
    cut = text.rfind("\n\n", 0, MAX_CHARS)
    return text[: cut if cut > MAX_CHARS // 2 else MAX_CHARS].rstrip()


def iter_documents(max_docs: int | None = None):
    """Yield the corpus documents in a fixed order."""
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for doc in _documents_of(module):
                doc = _trim(doc)
                if len(doc) < MIN_CHARS:
                    continue
                yield doc
                count += 1
                if max_docs is not None and count >= max_docs:
                    return


def write_demo_corpus(path: str, max_docs: int | None = None, text_field: str = "text") -> int:
    """Write the corpus as JSONL (one {"text": ...} per line) atomically; return the number of docs."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    count = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in iter_documents(max_docs):
            fh.write(json.dumps({text_field: doc}, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


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
    count = write_demo_corpus(cfg.paths.data_path, args.max_docs, cfg.training.text_field)
    print(f"wrote {count} documents to {cfg.paths.data_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
