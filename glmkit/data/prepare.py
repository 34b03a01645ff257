"""Preparing the corpus once: token stores for every input file, then this run's rows, cached on disk.

    python train_qlora.py --config C --prepare-data    # tokenize + lay out rows, print a summary, exit

The cache lives under `<paths.scratch_dir>/tokenized/`:

    files/<key>/   one token store per input file (glmkit/data/token_store.py), keyed by the file's
                   path, size and mtime, the tokenizer and the text field (a chat file: its chat
                   settings and the chat template, glmkit/data/chat.py)
    rows/<key>/    the run's rows (glmkit/data/rows.py's layout: pieces of the stores, not copies of
                   tokens) for train and val, and summary.json; keyed by the stores plus every
                   setting that shapes rows (sources and weights, seed, val_fraction,
                   max_seq_length, packing)

No key is ever computed from the text itself, so a warm start only lists and stats the files, and
verifies the stores and rows it reuses (glmkit/data/cache.py: damaged ones are rebuilt); after a
preparation, stores of input files that changed or are gone are removed.

Which documents go where:
- validation: a document is held out when a hash of its content, salted with training.seed,
  falls below training.val_fraction. Adding a shard never moves an earlier validation document
  into training, and duplicate documents always land on the same side;
- training: each source contributes floor(weight) passes over its training documents plus,
  for a fractional weight, the documents whose (seeded) content hash falls below the fraction;
  the result is shuffled with training.seed and packed. Row order per epoch is the data
  loader's, a function of the seed and the epoch only.

One process prepares; every other process of the run (or of the node, when scratch_dir is
node-local) waits on a file lock and then memory-maps what it wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from glmkit.run.checkpoint_names import read_meta
from glmkit.data import cache, eval_sets
from glmkit.run.writes import WriteFailed, guarded_write
from glmkit.data import fingerprint as data_fingerprint
from glmkit.data import chat, sources
from glmkit.data import token_store
from glmkit.data.rows import Rows, load_layout, pack_layout, save_layout
from glmkit.data.sources import DataError
from glmkit.run.durable import rename_durably
from glmkit.run.host_memory import available_bytes as _available_memory

ROWS_VERSION = 2  # 2: chat documents kept whole in rows; files name their source; chat counts
SHOWN_BAD_LINES = 20


@dataclass
class PreparedData:
    train_rows: Rows
    val_rows: Rows
    summary: dict
    cache_dir: str
    prepared_here: bool  # this process tokenized or laid out rows (the others only mapped them)
    eval_sets: list[eval_sets.EvalSetData] = field(default_factory=list)  # eval.sets, in config order
    changed_sets: list[str] = field(default_factory=list)  # sets whose documents a --allow-data-change resume changed

    @property
    def bad_line_count(self) -> int:
        return sum(f["bad_lines"] for f in self.summary["files"])

    @property
    def fingerprint(self) -> dict:
        """The training data's (cached with the rows) and every eval set's, as a checkpoint records it."""
        return {**self.summary["fingerprint"],
                "eval_sets": [data_fingerprint.eval_set_entry(e.name, e.spec, e.summary["docs"], e.summary["sha256"],
                                                              e.reading) for e in self.eval_sets]}

    @property
    def chat_counts(self) -> dict:
        """{source or eval set: what became of its conversations} for every chat source and chat eval set
        (run_start's `chat`; empty without chat data)."""
        out = {s["path"]: s["chat"] for s in self.summary["sources"] if s.get("chat")}
        out.update({f"eval.sets.{e.name}": e.summary["chat"] for e in self.eval_sets if e.summary.get("chat")})
        return out


def tokenizer_workers(cfg) -> int:
    """performance.tokenizer_workers, or every core this process may run on."""
    if cfg.performance.tokenizer_workers:
        return cfg.performance.tokenizer_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cache_root(cfg) -> str:
    return os.path.join(cfg.paths.scratch_dir, "tokenized")


def prepare_data(cfg, tokenizer, show_progress: bool = True) -> PreparedData:
    """The run's train and val rows and its eval sets, tokenizing and laying out only what the cache lacks."""
    t = cfg.training
    root = cache_root(cfg)
    configured = sources.resolve_sources(cfg.paths.data_path, t.text_field)
    eval_configured = [eval_sets.resolve(i, e.name, e.path, t.text_field, e) for i, e in enumerate(cfg.eval.sets)]
    _check_chat_template(configured + eval_configured, tokenizer, cfg.paths.model_dir)
    identity = token_store.tokenizer_identity(tokenizer)
    # A store per (input file, how its rows become documents): a chat file is rendered per chat settings.
    files = _unique([(f, chat_settings(s, t)) for s in configured for f in s.files])
    all_files = _unique(files + [(f, chat_settings(s, t)) for s in eval_configured for f in s.files])
    store_dirs = {_key(e): os.path.join(root, "files", token_store.store_key(
                      e[0], identity, t.text_field, e[1], tokenizer.chat_template if e[1] else None))
                  for e in all_files}
    rows_key = json.dumps([ROWS_VERSION, [os.path.basename(store_dirs[_key(e)]) for e in files],
                           [([f.path for f in s.files], s.weight) for s in configured],
                           t.seed, t.val_fraction, t.max_seq_length, t.packing])
    rows_dir = os.path.join(root, "rows", hashlib.sha256(rows_key.encode()).hexdigest()[:24])
    eval_dirs = [os.path.join(root, "rows", eval_sets.rows_key(
                     e.name, [store_dirs[(f.path, chat_settings(src, t))] for f in src.files], rows_dir,
                     t.max_seq_length, t.packing))
                 for e, src in zip(cfg.eval.sets, eval_configured, strict=True)]
    has_summary = lambda folder: os.path.isfile(os.path.join(folder, "summary.json"))  # noqa: E731
    prepared_here = False
    with _preparer_lock(root):
        train_store_dirs = [store_dirs[_key(e)] for e in files]
        _discard_damaged(store_dirs, train_store_dirs, rows_dir)
        ready = all(map(has_summary, [rows_dir, *eval_dirs])) and all(map(os.path.isdir, store_dirs.values()))
        if not ready:
            _remove_stale_temporaries(root)
            missing = [(f, store_dirs[_key((f, settings))], settings) for f, settings in all_files
                       if not os.path.isdir(store_dirs[_key((f, settings))])]
            # A failed store write removes its own temp folder (token_store._StoreWriter.abandon).
            with _cache_write(os.path.join(root, "files")):
                _tokenize(missing, tokenizer, cfg, show_progress)
            stores = {key: token_store.Store.open(folder) for key, folder in store_dirs.items()}
            check_bad_lines([s.meta for s in stores.values()], t.skip_bad_lines)
            train_stores = [stores[_key(e)] for e in files]
            if not has_summary(rows_dir):
                with _cache_write(rows_dir, partial=_rows_tmp(rows_dir)):
                    _write_rows(rows_dir, configured, files, train_stores, cfg)
            if not all(map(has_summary, eval_dirs)):
                trained_on = training_digests(train_stores, t)
                for e, src, folder in zip(cfg.eval.sets, eval_configured, eval_dirs, strict=True):
                    if not has_summary(folder):
                        with _cache_write(folder):
                            eval_sets.write_rows(folder, e.path, [stores[(f.path, chat_settings(src, t))]
                                                                  for f in src.files],
                                                 trained_on, t.max_seq_length, t.packing)
            prepared_here = True
            count, freed = cache.remove_unreachable(root, set(store_dirs.values()))
            if count:
                print(f"data: removed {count} token store(s) of input files that changed or are gone "
                      f"({freed / 2**20:,.1f} MiB freed)", file=sys.stderr, flush=True)
    with open(os.path.join(rows_dir, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    check_bad_lines(summary["files"], t.skip_bad_lines)
    opened = {key: token_store.Store.open(folder) for key, folder in store_dirs.items()}
    tokens = {key: store.tokens() for key, store in opened.items()}
    bits = {key: store.trained() for key, store in opened.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = {name: Rows([tokens[_key(e)] for e in files], load_layout(rows_dir, name), t.max_seq_length, pad,
                       t.packing, [bits[_key(e)] for e in files])
            for name in ("train", "val")}
    named = []
    for i, (e, src, folder) in enumerate(zip(cfg.eval.sets, eval_configured, eval_dirs, strict=True)):
        keys = [(f.path, chat_settings(src, t)) for f in src.files]
        named.append(eval_sets.load(e.name, e.path, folder, [tokens[k] for k in keys], t.max_seq_length, pad,
                                    t.packing, i, [bits[k] for k in keys], data_fingerprint.reading_of(e)))
    for eval_set in named:
        check_bad_lines(eval_set.summary["files"], t.skip_bad_lines)
    return PreparedData(rows["train"], rows["val"], summary, rows_dir, prepared_here, named)


def chat_settings(source: sources.Source, t) -> chat.ChatSettings | None:
    """How a source's rows become documents: None for text, its chat settings for chat."""
    if source.format != "chat":
        return None
    return chat.ChatSettings(source.train_on, t.max_seq_length, source.long_conversations)


def _key(entry: tuple) -> tuple:
    """A store's key in this module: (input file path, chat settings or None)."""
    return entry[0].path, entry[1]


def _check_chat_template(configured: list, tokenizer, model_dir: str) -> None:
    chats = [s.spec for s in configured if s.format == "chat"]
    problem = chat.template_problem(tokenizer, model_dir) if chats else None
    if problem:
        raise DataError(f"{problem} (chat source {chats[0]})")


def _unique(entries: list) -> list:
    """(input file, chat settings) pairs without repeats, in order (a file read the same way twice is one
    token store)."""
    return list({_key(e): e for e in entries}.values())


def _discard_damaged(store_dirs: dict, train_store_dirs: list[str], rows_dir: str) -> None:
    """Remove (to rebuild) each of this run's stores (training and eval files) that fails its checks, and the
    training rows if they do (the rows index the training stores, in order)."""
    for path in store_dirs.values():
        if os.path.isdir(path):
            reason = token_store.damage(path)
            if reason:
                cache.discard(path, "token store", reason)
    if os.path.isfile(os.path.join(rows_dir, "summary.json")) and all(map(os.path.isdir, train_store_dirs)):
        tokens = [token_store.Store.open(path).meta["tokens"] for path in train_store_dirs]
        reason = cache.rows_damage(rows_dir, tokens)
        if reason:
            cache.discard(rows_dir, "rows folder", reason)


def _cache_write(path: str, partial: str | None = None):
    return guarded_write("the data cache", path, partial=partial, passes=(DataError,),
                         intact="the input data and the token stores finished earlier are intact",
                         fix="rerun (finished stores are reused), or move paths.scratch_dir to a bigger disk")


def _rows_tmp(rows_dir: str) -> str:
    return f"{rows_dir}.tmp-{os.uname().nodename}-{os.getpid()}"


@contextlib.contextmanager
def _preparer_lock(root: str):
    """One preparer at a time per cache folder; the OS releases the lock if its holder dies."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".prepare.lock"), "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            print(f"data: waiting for {holder} to prepare the data in {root}", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):  # who holds it is only for the waiting message: a full disk may refuse
            os.ftruncate(fh.fileno(), 0)
            os.pwrite(fh.fileno(), f"process {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        yield


def _remove_stale_temporaries(root: str) -> None:
    """Folders a killed preparer left half-written (only ours: `<key>.tmp-<host>-<pid>`); we hold the lock."""
    for kind in ("files", "rows"):
        folder = os.path.join(root, kind)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if ".tmp-" in name:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _tokenize(missing, tokenizer, cfg, show_progress: bool) -> None:
    if not missing:
        return
    from tqdm.auto import tqdm

    workers = tokenizer_workers(cfg)
    total = sum(entry[0].size for entry in missing)
    started = time.time()
    with tqdm(total=total, unit="B", unit_scale=True, dynamic_ncols=True, disable=not show_progress,
              desc=f"tokenizing {len(missing)} file(s), {workers} worker(s)") as bar:
        token_store.build_stores(missing, tokenizer, cfg.training.text_field, workers, bar)
    print(f"data: tokenized {len(missing)} file(s), {total / 2**20:.1f} MiB, with {workers} worker(s) in "
          f"{time.time() - started:.1f} s (process {os.getpid()})", file=sys.stderr, flush=True)


def check_bad_lines(file_metas: list[dict], skip: bool) -> None:
    bad = [m for m in file_metas if m["bad_lines"]]
    if not bad or skip:
        return
    total = sum(m["bad_lines"] for m in bad)
    shown = [line for m in bad for line in m["bad_examples"]][:SHOWN_BAD_LINES]
    more = f"\n... and {total - len(shown)} more" if total > len(shown) else ""
    per_file = ", ".join(f"{m['path']}: {m['bad_lines']}" for m in bad[:10]) + (", ..." if len(bad) > 10 else "")
    raise DataError(f"{total} bad line(s) in {len(bad)} file(s) ({per_file}); fix them or set "
                    f"training.skip_bad_lines: true\n" + "\n".join(shown) + more)


# ---------------------------------------------------------------------------
# Which documents go where, and the rows
# ---------------------------------------------------------------------------

def _salt(purpose: str, seed: int) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(f"{purpose}:{seed}".encode(), digest_size=8).digest(), "little"))


def _unit_interval(words: np.ndarray, salt: np.uint64) -> np.ndarray:
    """A uniform number in [0, 1) per 64-bit content hash, different for each salt (splitmix64's finaliser)."""
    with np.errstate(over="ignore"):
        z = words ^ salt
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def layout_bytes(epoch_docs: int, epoch_tokens: int, max_seq_length: int, packing: bool) -> int:
    """Memory the epoch's row layout takes while it is built: per document its id, start and length (8 bytes
    each); per piece (at most one per document plus one per row) an int64 start and a uint32 length, twice
    while the blocks are joined; per row its pointer and count (8 bytes each)."""
    rows = -(-epoch_tokens // max_seq_length) if packing else epoch_docs
    return 24 * epoch_docs + 24 * (epoch_docs + rows) + 16 * rows


def _check_layout_fits(needed: int, epoch_docs: int, described: str) -> None:
    """Refuse, before allocating, an epoch whose source weights make the row layout outgrow memory."""
    available = _available_memory()
    if available is not None and needed > available:
        raise DataError(f"{described}: the source weights make an epoch of {epoch_docs:,} training documents, "
                        f"whose row layout needs about {needed / 2**30:.1f} GiB of memory while "
                        f"{available / 2**30:.1f} GiB are available; lower the weights in paths.data_path "
                        f"(training.epochs or training.max_steps repeat the data instead)")


def _held_out(digests: np.ndarray, t) -> np.ndarray:
    """Which documents (by 16-byte content hash) fall into the validation split."""
    words = np.ascontiguousarray(digests).view(np.uint64)  # two little-endian words per document
    return _unit_interval(words[:, 0].copy(), _salt("validation", t.seed)) < t.val_fraction


def training_digests(stores, t) -> np.ndarray:
    """The content hashes of the training sources' documents outside the validation split: what eval sets
    must not share."""
    digests = np.concatenate([s.digests() for s in stores] or [np.zeros((0, 16), np.uint8)])
    return digests[~_held_out(digests, t)]


def _write_rows(rows_dir: str, configured, files, stores, cfg) -> None:
    t = cfg.training
    lengths = np.concatenate([s.lengths() for s in stores] or [np.zeros(0, np.uint32)]).astype(np.int64)
    digests = np.concatenate([s.digests() for s in stores] or [np.zeros((0, 16), np.uint8)])
    doc_base = np.concatenate([[0], np.cumsum([s.meta["docs"] for s in stores])]).astype(np.int64)
    # The stores, end to end, are one token space: a document starts where the previous one ended.
    starts = np.cumsum(lengths) - lengths
    words = np.ascontiguousarray(digests).view(np.uint64)  # two little-endian words per document
    is_val = _held_out(digests, t)
    subset_u = _unit_interval(words[:, 1].copy(), _salt("weight-subset", t.seed))
    file_index = {_key(e): i for i, e in enumerate(files)}
    # Chat documents are never split over two rows (glmkit/data/rows.py).
    whole = np.concatenate([np.full(s.meta["docs"], "chat" in s.meta) for s in stores] or [np.zeros(0, bool)])
    source_of = {}

    # Per source: its documents (memory grows with the corpus), and how often each pass repeats them.
    plans, source_rows = [], []
    for number, source in enumerate(configured):
        indices = [file_index[(f.path, chat_settings(source, t))] for f in source.files]
        source_of.update(dict.fromkeys(indices, number))
        ids = np.concatenate([np.arange(doc_base[i], doc_base[i + 1]) for i in indices] or [np.zeros(0, np.int64)])
        train_ids = ids[~is_val[ids]]
        passes, fraction = int(math.floor(source.weight)), source.weight - math.floor(source.weight)
        subset = train_ids[subset_u[train_ids] < fraction]
        plans.append((train_ids, passes, subset))
        source_rows.append({"path": source.spec, "weight": source.weight, "files": len(source.files),
                            "docs": int(len(ids)), "tokens": int(lengths[ids].sum()),
                            "train_docs": int(len(train_ids)), "val_docs": int(is_val[ids].sum()),
                            "train_docs_per_epoch": passes * len(train_ids) + len(subset),
                            "train_tokens_per_epoch": passes * int(lengths[train_ids].sum())
                            + int(lengths[subset].sum()),
                            "format": source.format, "trained_tokens": sum(_trained_tokens(stores[i]) for i in indices)})
        if source.format == "chat":
            source_rows[-1].update(train_on=source.train_on, long_conversations=source.long_conversations,
                                   chat=_chat_counts([stores[i] for i in indices]))
    epoch_docs = sum(row["train_docs_per_epoch"] for row in source_rows)
    epoch_tokens = sum(row["train_tokens_per_epoch"] for row in source_rows)
    _check_layout_fits(layout_bytes(epoch_docs, epoch_tokens, t.max_seq_length, t.packing), epoch_docs,
                       sources.describe(cfg.paths.data_path))
    # The epoch's documents in one array, filled pass by pass (no list of copies to concatenate), then
    # shuffled in place: the same order as indexing with rng.permutation, without a second array.
    train_ids, filled = np.empty(epoch_docs, dtype=np.int64), 0
    for ids, passes, subset in plans:
        for part in [ids] * passes + [subset]:
            train_ids[filled:filled + len(part)] = part
            filled += len(part)
    np.random.default_rng(t.seed).shuffle(train_ids)
    val_ids = np.flatnonzero(is_val)
    describe = sources.describe(cfg.paths.data_path)
    if len(train_ids) == 0:
        raise DataError(f"{describe}: no training documents ({len(lengths)} usable in all; each line needs a "
                        f"non-empty {t.text_field!r}); add documents or lower training.val_fraction")
    if t.val_fraction > 0 and len(val_ids) == 0:
        raise DataError(f"{describe}: no document fell into the validation split ({len(lengths)} documents, "
                        f"training.val_fraction {t.val_fraction}); add documents, raise training.val_fraction, "
                        f"or set it to 0 to train without validation")

    tmp = _rows_tmp(rows_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    split_rows = {}
    for name, ids in (("train", train_ids), ("val", val_ids)):
        layout = pack_layout(starts[ids], lengths[ids], t.max_seq_length, t.packing, whole[ids])
        save_layout(tmp, name, layout)
        n_rows, real = len(layout[0]) - 1, int(layout[2].sum(dtype=np.int64))
        capacity = n_rows * t.max_seq_length if t.packing else real
        split_rows[name] = {"rows": n_rows, "docs": int(len(ids)), "tokens": real,
                            "real_token_share": real / capacity if capacity else 1.0}
    val_digests = np.sort(np.ascontiguousarray(digests[val_ids]).view("V16").ravel())
    summary = {
        "version": ROWS_VERSION,
        "files": [{**{k: s.meta[k] for k in ("path", "format", "size", "mtime_ns", "lines", "docs", "tokens",
                                               "bad_lines", "bad_examples")},
                   "val_docs": int(is_val[doc_base[i]:doc_base[i + 1]].sum()), "store": s.path,
                   "source": source_of[i], **({"chat": s.meta["chat"]} if "chat" in s.meta else {})}
                  for i, s in enumerate(stores)],
        "sources": source_rows,
        "train": split_rows["train"], "val": split_rows["val"],
        "settings": {"seed": t.seed, "val_fraction": t.val_fraction, "max_seq_length": t.max_seq_length,
                     "packing": t.packing, "text_field": t.text_field},
        "fingerprint": data_fingerprint.fingerprint(configured, len(val_ids), val_digests.tobytes()),
        "prepared_by": {"host": os.uname().nodename, "pid": os.getpid(), "time": time.time()},
    }
    with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    os.makedirs(os.path.dirname(rows_dir), exist_ok=True)
    if os.path.isdir(rows_dir):  # the same rows, kept while their token stores were rebuilt
        shutil.rmtree(tmp)
    else:
        rename_durably(tmp, rows_dir)  # on disk before it is visible (a power cut)


def _trained_tokens(store) -> int:
    """Tokens of a store the loss counts: a chat store's trained ones, or every text token but each document's
    first (never a target)."""
    if "chat" in store.meta:
        return int(store.meta["chat"]["trained_tokens"])
    return int(store.meta["tokens"]) - int(store.meta["docs"])


def _chat_counts(stores) -> dict:
    """What became of the conversations of chat stores, summed (glmkit/data/chat.py's counts)."""
    return {key: sum(int(s.meta["chat"][key]) for s in stores) for key in chat.COUNTS}


# ---------------------------------------------------------------------------
# The summary and the --prepare-data command
# ---------------------------------------------------------------------------

def cache_bytes(prepared: PreparedData) -> int:
    stores = sum(token_store.Store(f["store"], {}).nbytes() for f in prepared.summary["files"])
    rows = sum(os.path.getsize(os.path.join(prepared.cache_dir, n)) for n in os.listdir(prepared.cache_dir))
    return stores + rows


def format_summary(prepared: PreparedData, elapsed: float) -> str:
    s = prepared.summary
    files = s["files"]
    lines = [f"files: {len(files)} ({sum(f['size'] for f in files) / 2**20:,.1f} MiB on disk)"]
    for source in s["sources"]:
        lines.append(f"source {source['path']} (weight {source['weight']:g}): {source['files']} file(s), "
                     f"{source['docs']:,} documents, {source['tokens']:,} tokens; per epoch "
                     f"{source['train_docs_per_epoch']:,} training documents, {source['train_tokens_per_epoch']:,} "
                     f"tokens; {source['val_docs']:,} validation documents")
        if source.get("chat"):
            lines.append(f"  chat, train_on {source['train_on']}: {chat_line(source['chat'], source['tokens'])}")
    bad = [f for f in files if f["bad_lines"]]
    lines.append(f"bad lines: {sum(f['bad_lines'] for f in files):,}" + (" (skipped)" if bad else ""))
    lines += [f"  {f['path']}: {f['bad_lines']:,}" for f in bad[:20]]
    if len(bad) > 20:
        lines.append(f"  ... and {len(bad) - 20} more file(s)")
    for name in ("train", "val"):
        split = s[name]
        lines.append(f"{name}: {split['rows']:,} rows from {split['docs']:,} documents, {split['tokens']:,} tokens, "
                     f"{100 * split['real_token_share']:.1f}% real tokens")
    for eval_set in prepared.eval_sets:
        e = eval_set.summary
        lines.append(f"eval set {eval_set.name} ({eval_set.spec}): {e['rows']:,} rows from {e['docs']:,} documents, "
                     f"{e['tokens']:,} tokens")
        if e.get("chat"):
            lines.append(f"  chat: {chat_line(e['chat'], e['tokens'])}")
    size = cache_bytes(prepared)
    tokens = sum(f["tokens"] for f in files)
    lines.append(f"cache: {prepared.cache_dir} and {len(files)} token store(s), {size / 2**20:,.1f} MiB "
                 f"({size / max(tokens, 1):.2f} bytes per token)")
    lines.append(f"elapsed: {elapsed:.1f} s" + ("" if prepared.prepared_here else " (the cache was warm)"))
    return "\n".join(lines)


def chat_line(counts: dict, tokens: int) -> str:
    """A chat source's counts in one line: conversations, what was split or dropped, the trained share."""
    return (f"{counts['conversations']:,} conversations ({counts['split']:,} split into {counts['pieces']:,} pieces, "
            f"{counts['dropped']:,} dropped whole; {counts['dropped_rounds']:,} rounds longer than "
            f"training.max_seq_length left out); {counts['trained_tokens']:,} of {tokens:,} tokens trained")


def load_tokenizer(cfg):
    """The model's tokenizer, without its weights."""
    model_dir = cfg.paths.model_dir
    if not any(os.path.isfile(os.path.join(model_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        raise DataError(f"{model_dir} has no tokenizer (paths.model_dir); run `python download_model.py` "
                        f"(CPU demo: --tiny) first: preparing data needs only the tokenizer files")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def run_prepare_cli(cfg) -> int:
    """--prepare-data: tokenize and lay out rows with no model weights loaded, print the summary, exit."""
    started = time.time()
    try:
        prepared = prepare_data(cfg, load_tokenizer(cfg))
    except (DataError, WriteFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(prepared, time.time() - started))
    return 0


def prepare_for_run(cfg, tokenizer, accelerator, logs, resume_path: str | None, allow_data_change: bool) -> PreparedData:
    """The trainer's data: prepared (or mapped) on every process, summarised once, checked against the resumed checkpoint."""
    started = time.time()
    prepared = prepare_data(cfg, tokenizer)
    accelerator.print(format_summary(prepared, time.time() - started))
    if resume_path:
        meta = read_meta(resume_path)
        saved = meta.get("data_fingerprint")
        changes = data_fingerprint.check_resume(resume_path, saved, prepared.fingerprint, allow_data_change,
                                                accelerator.print, cfg.eval.select_by)
        if changes:
            logs.event("data_changed", meta.get("step", 0), checkpoint=resume_path, changes=changes,
                       allowed_by=data_fingerprint.OPT_IN_FLAG)
            prepared = replace(prepared, changed_sets=data_fingerprint.changed_sets(saved, prepared.fingerprint))
    return prepared
