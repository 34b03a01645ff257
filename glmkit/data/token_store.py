"""Token stores: each input file tokenized once, in worker processes, into compact files on disk.

A store is a folder `<scratch>/tokenized/files/<key>/` keyed by the file's path, size and
mtime, the tokenizer and the text field, so adding a shard tokenizes only that shard. It holds

    tokens.u32    every document's ids followed by EOS, end to end (uint32: 4 bytes a token)
    lengths.u32   tokens per document
    digests.b16   16-byte BLAKE2b of each document's UTF-8 text (the validation split and the
                  data fingerprint are functions of these, not of positions in the corpus)
    trained.bits  chat files only: one bit per token, set where the loss trains on it (glmkit/data/chat.py
                  says which), packed little-endian 8 to a byte: 4.125 bytes a token with tokens.u32
    meta.json     the file's identity, counts, its bad lines (count + the first few as file:line),
                  BLAKE2b checksums of lengths.u32, digests.b16 and trained.bits, and a CRC-32 of every
                  64 MiB block of tokens.u32 (`damage` checks them all, and every file's size against the
                  counts, before a store is reused); a chat store's conversation counts (split, dropped,
                  trained tokens)

A chat file's store is keyed by its chat settings too (train_on, max_seq_length, long_conversations)
and the chat template, so changing any of them renders the file again instead of reusing a stale mask.

The reading process streams chunks of raw lines to a pool of workers (one core each) and
writes their results in order; at most a few chunks are in flight, so memory does not grow
with the corpus. A store is written into a temporary folder, flushed to the disk (every file and the
folder) and renamed when complete (glmkit/run/durable.py), so a power cut never leaves a store under
its final name that holds zeros. A store damaged anyway (a disk that lied about a flush, a file
overwritten) fails `damage` and is rebuilt: a half-zeroed tokens.u32 of the right size does not pass.

Why CRC-32 in blocks for tokens.u32 (about 4 bytes a token, the bulk of the cache): every warm start
reads it whole, so the check must cost little more than the read. zlib's CRC-32 ran at 1.4 GB/s on one
core here, SHA-256 at 0.7 GB/s (with SHA-NI), BLAKE2b at 0.5-0.6 GB/s; blocks are checked on every core
at once (zlib releases the GIL). A 1 GiB corpus' stores verify in about 0.9 s on two busy cores
(docs/BENCHMARKS.md). CRC-32 finds any damage of a block but for one pattern in 4 billion; it is no
defence against a deliberate edit, which is not what it is for.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import types
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from glmkit.data import chat, sources
from glmkit.run.durable import rename_durably
from glmkit.run.parent_death import signal_on_parent_death

STORE_VERSION = 1
TRAINED_BITS = "trained.bits"
BAD_EXAMPLES = 20  # bad lines kept verbatim per file; all are counted
TOKENS_BLOCK_BYTES = 64 << 20  # tokens.u32 is checksummed per block of this many bytes, verified in parallel
_READ_BYTES = 8 << 20
# The Rust tokenizer keeps about 130 bytes of bookkeeping per character of the string it encodes, so one
# 50 MB document took 6.5 GB in its worker. A document longer than this is encoded in pieces of at most this
# many characters, ids concatenated (still one document, one EOS), CHUNK_BYTES of characters (two pieces,
# as much as a regular chunk) per encode call. A piece ends just before a space followed by a non-space
# character: the split regex of a byte-level pre-tokenizer (GPT-2's, and the cl100k-style ones) attaches
# that space to the next word either way, so the ids equal those of the whole text. Only without such a
# space in the window does a piece end before other whitespace followed by non-whitespace (a newline or
# tab: the same ids under GPT-2's regex, the kit's tiny tokenizer; a cl100k-style regex joins punctuation or
# whitespace before a newline with it, so the tokens at that one boundary can differ), and only without any
# whitespace at the limit itself (a word cut in two: its tokens around the cut can differ).
LONG_DOCUMENT_CHARS = 2**20
_WHITESPACE_BEFORE_WORD = re.compile(r"\s(?=\S)")


def tokenizer_identity(tokenizer) -> dict:
    """What about the tokenizer shapes its ids: its full definition (hashed), EOS, and its size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return {"sha256": hashlib.sha256(definition.encode()).hexdigest(), "eos": tokenizer.eos_token_id,
            "size": len(tokenizer)}


def store_key(item: sources.InputFile, tokenizer_id: dict, text_field: str,
              chat_settings: chat.ChatSettings | None = None, template: str | None = None) -> str:
    """The store's folder name: the file's identity, the tokenizer, and how its rows become documents (the text
    field; for a chat file its settings and the chat template)."""
    reading = text_field if chat_settings is None else \
        [*chat_settings.key(), hashlib.sha256((template or "").encode()).hexdigest()]
    key = json.dumps([STORE_VERSION, item.identity(), tokenizer_id, reading])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass
class Store:
    """A finished store, memory-mapped: nothing is read until it is indexed."""
    path: str
    meta: dict

    @classmethod
    def open(cls, path: str) -> Store:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as fh:
            return cls(path, json.load(fh))

    def array(self, name: str, dtype, shape_tail=()) -> np.ndarray:
        path = os.path.join(self.path, name)
        if os.path.getsize(path) == 0:  # np.memmap refuses an empty file
            return np.zeros((0, *shape_tail), dtype=dtype)
        data = np.memmap(path, dtype=dtype, mode="r")
        return data.reshape(-1, *shape_tail) if shape_tail else data

    def tokens(self) -> np.ndarray:
        return self.array("tokens.u32", np.uint32)

    def lengths(self) -> np.ndarray:
        return self.array("lengths.u32", np.uint32)

    def digests(self) -> np.ndarray:
        return self.array("digests.b16", np.uint8, (16,))

    def trained(self) -> np.ndarray | None:
        """A chat store's trained bits (packed, little-endian); None for text, where every token is trained."""
        return self.array(TRAINED_BITS, np.uint8) if "chat" in self.meta else None

    def nbytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, n)) for n in os.listdir(self.path))


def damage(path: str) -> str | None:
    """Why the store at `path` can't be trusted, in a few words (None: it verifies).

    Every file's size must match the counts in meta.json (tokens.u32: 4 bytes a token, lengths.u32: 4 a
    document, digests.b16: 16 a document, a chat store's trained.bits: one bit a token), the lengths must
    add up to the tokens, lengths.u32, digests.b16 and trained.bits must match the BLAKE2b checksums
    written with them (the bits decide what is trained: 1/32 of the tokens' size, cheap to hash), and every
    block of tokens.u32 its CRC-32 (stores written before those were recorded are checked by size).
    """
    try:
        store = Store.open(path)
        meta = store.meta
        expected = {"tokens.u32": 4 * int(meta["tokens"]), "lengths.u32": 4 * int(meta["docs"]),
                    "digests.b16": 16 * int(meta["docs"])}
        if "chat" in meta:
            expected[TRAINED_BITS] = (int(meta["tokens"]) + 7) // 8
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"meta.json unreadable: {exc.__class__.__name__}"
    for name, size in expected.items():
        try:
            actual = os.path.getsize(os.path.join(path, name))
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} holds {actual:,} bytes, its meta.json says {size:,}"
    if int(store.lengths().sum(dtype=np.int64)) != int(meta["tokens"]):
        return "lengths.u32 does not add up to the token count in meta.json"
    for name, want in meta.get("checksums", {}).items():  # stores written before checksums have none
        with open(os.path.join(path, name), "rb") as fh:
            if hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest() != want:
                return f"{name} does not match its checksum"
    return _tokens_damage(os.path.join(path, "tokens.u32"), meta.get("tokens_crc32"))


class BlockCrc:
    """CRC-32 of each TOKENS_BLOCK_BYTES block of a stream, fed as it is written."""

    def __init__(self, block_bytes: int = TOKENS_BLOCK_BYTES):
        self.block_bytes, self.blocks, self.crc, self.filled = block_bytes, [], 0, 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.block_bytes - self.filled)
            self.crc, self.filled, view = zlib.crc32(view[:take], self.crc), self.filled + take, view[take:]
            if self.filled == self.block_bytes:
                self.blocks.append(self.crc)
                self.crc = self.filled = 0

    def record(self) -> dict:
        """What meta.json keeps: the block size and every block's CRC (the last one may be short)."""
        return {"block_bytes": self.block_bytes, "blocks": self.blocks + ([self.crc] if self.filled else [])}


def _block_crc(path: str, start: int, size: int) -> int:
    crc, buffer = 0, bytearray(min(_READ_BYTES, size))
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        while size > 0:
            got = fh.readinto(memoryview(buffer)[:min(len(buffer), size)])
            if not got:
                break
            crc, size = zlib.crc32(memoryview(buffer)[:got], crc), size - got
    return crc


def _tokens_damage(path: str, recorded: dict | None) -> str | None:
    """Which block of tokens.u32 differs from what was written (every block read once, on every core)."""
    if recorded is None:  # a store written before the tokens were checksummed: its size was checked
        return None
    size, block = os.path.getsize(path), int(recorded["block_bytes"])
    starts = range(0, size, block)
    if len(starts) != len(recorded["blocks"]):
        return f"tokens.u32 has {len(starts)} checksum blocks, its meta.json lists {len(recorded['blocks'])}"
    workers = min(len(starts), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1) or 1
    with ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(lambda start: _block_crc(path, start, min(block, size - start)), starts))
    for start, got, want in zip(starts, found, recorded["blocks"]):
        if got != want:
            return (f"tokens.u32 does not match its checksum in bytes {start:,} to {min(start + block, size):,} "
                    f"of {size:,}")
    return None


# ---------------------------------------------------------------------------
# Workers: each tokenizes chunks of raw lines with one core
# ---------------------------------------------------------------------------

_worker = {}


def _init_worker(tokenizer_spec: tuple[str, str], eos: int, text_field: str, chat_tokenizer=None) -> None:
    # A worker whose preparer was killed would otherwise live on, blocked on its pipe, and print a
    # BrokenPipeError traceback when it notices: the kernel ends it quietly with its parent instead.
    signal_on_parent_death(signal.SIGKILL)
    # One core per worker: the pool is the parallelism (the Rust tokenizer would otherwise spawn threads).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    kind, value = tokenizer_spec
    if kind == "json":
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(value)
        encode = lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]  # noqa: E731
    else:  # a tokenizer without a Rust backend: load it as the trainer does
        from transformers import AutoTokenizer

        slow = AutoTokenizer.from_pretrained(value)
        encode = lambda texts: slow(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    # Chat files: the parent's own tokenizer (pickled), whose chat template renders the conversations.
    renderer = chat.Renderer(chat_tokenizer) if chat_tokenizer is not None else None
    _worker.update(encode=encode, eos=eos, text_field=text_field, renderer=renderer)


def tokenize_chunk(first_line: int, records: list, parquet: bool, chat_settings: chat.ChatSettings | None = None):
    """(ids with EOS after each document, lengths, digests, [(line, reason)]) for one chunk; a chat chunk adds
    (trained flags, conversation counts)."""
    if chat_settings is not None:
        return _chat_chunk(first_line, records, parquet, chat_settings)
    text_field, texts, digests, bad = _worker["text_field"], [], [], []
    for number, record in enumerate(records, start=first_line):
        text, reason = sources.check_text(record, text_field) if parquet else sources.parse_line(record, text_field)
        if text is not None:
            data, reason = sources.utf8(text, text_field)
            if data is not None:
                texts.append(text)
                digests.append(hashlib.blake2b(data, digest_size=16).digest())
            del data  # a long document's bytes need not live on through its tokenization
        if reason is not None:
            bad.append((number, reason))
    rows = _encode_documents(texts)
    lengths = np.fromiter((len(row) + 1 for row in rows), dtype=np.uint32, count=len(rows))
    ends = np.cumsum(lengths, dtype=np.int64)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint32)
    flat[ends - 1] = _worker["eos"]
    for row, end in zip(rows, ends.tolist()):
        flat[end - 1 - len(row):end - 1] = row
    return flat, lengths, b"".join(digests), bad


def _chat_chunk(first_line: int, records: list, parquet: bool, settings: chat.ChatSettings):
    renderer: chat.Renderer = _worker["renderer"]
    conversations, numbers, bad = [], [], []
    for number, record in enumerate(records, start=first_line):
        reason = None
        if not parquet:
            record, reason = sources.parse_object(record)
            if record is None and reason is None:
                continue  # a blank line
        if reason is None:
            conversation, reason = chat.conversation(record)
        if reason is None:
            reason = sources.utf8(conversation.canonical, "messages")[1]
        if reason is None:
            conversations.append(conversation)
            numbers.append(number)
        else:
            bad.append((number, reason))
    rendered = _render(renderer, conversations)
    docs, digests, counts = [], [], chat.new_counts()
    for number, conversation, ids in zip(numbers, conversations, rendered, strict=True):
        try:
            if isinstance(ids, str):  # the template refused it
                raise ValueError(ids)
            pieces = renderer.documents(conversation, ids, settings, counts)
        except ValueError as exc:
            bad.append((number, str(exc)))
            continue
        digest = hashlib.blake2b(conversation.canonical.encode("utf-8"), digest_size=16).digest()
        docs += pieces
        digests += [digest] * len(pieces)  # a split conversation's pieces share its hash: one side of the split
    bad.sort()
    lengths = np.fromiter((len(ids) for ids, _ in docs), dtype=np.uint32, count=len(docs))
    flat = np.concatenate([ids for ids, _ in docs]) if docs else np.zeros(0, np.uint32)
    trained = np.concatenate([flags for _, flags in docs]) if docs else np.zeros(0, bool)
    return flat, lengths, b"".join(digests), bad, trained, counts


def _render(renderer: chat.Renderer, conversations: list) -> list:
    """Each conversation's ids, or the template's error as a string (one conversation at a time on failure)."""
    try:
        return renderer.ids(conversations)
    except Exception:  # noqa: BLE001 - a template may raise anything (jinja2 errors, raise_exception, TypeError)
        out = []
        for conversation in conversations:
            try:
                out += renderer.ids([conversation])
            except Exception as exc:  # noqa: BLE001
                out.append(f"the chat template failed on this conversation ({type(exc).__name__}: {exc})")
        return out


def _encode_documents(texts: list[str]) -> list:
    """Each text's ids (a list, or an array for a long document), the short ones in one encode call."""
    encode, rows = _worker["encode"], [None] * len(texts)
    short = [i for i, text in enumerate(texts) if len(text) <= LONG_DOCUMENT_CHARS]
    for i, row in zip(short, encode([texts[i] for i in short]) if short else []):
        rows[i] = row
    for i, text in enumerate(texts):
        if rows[i] is None:
            rows[i] = _encode_in_pieces(text, encode)
    return rows


def _encode_in_pieces(text: str, encode) -> np.ndarray:
    per_call = max(1, sources.CHUNK_BYTES // LONG_DOCUMENT_CHARS)
    parts, batch = [], []
    for piece in _pieces(text):
        batch.append(piece)
        if len(batch) == per_call:
            parts += [np.array(row, dtype=np.uint32) for row in encode(batch)]
            batch = []
    if batch:
        parts += [np.array(row, dtype=np.uint32) for row in encode(batch)]
    return np.concatenate(parts)


def _pieces(text: str):
    """text in consecutive pieces of at most LONG_DOCUMENT_CHARS, cut where the comment above says."""
    start = 0
    while len(text) - start > LONG_DOCUMENT_CHARS:
        limit = start + LONG_DOCUMENT_CHARS  # < len(text), so text[cut + 1] exists for any cut < limit
        cut = text.rfind(" ", start + 1, limit)
        while cut > start and text[cut + 1].isspace():
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:  # endpos limit + 1: the lookahead may see text[limit], a match never starts there
            found = _WHITESPACE_BEFORE_WORD.finditer(text, start + 1, limit + 1)
            cut = max((match.start() for match in found), default=limit)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _start_pool(workers: int, tokenizer, eos: int, text_field: str, with_chat: bool = False):
    """A pool of fresh interpreters that import only this module, its sources and tokenizers (and for chat
    files transformers, to render with the tokenizer's chat template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = ("json", backend.to_str()) if backend is not None else ("path", tokenizer.name_or_path)
    context = multiprocessing.get_context("spawn")
    # A spawned worker re-runs the parent's __main__ (train_qlora.py imports torch) unless it has no file;
    # workers need none of it, so they start from an empty __main__.
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        return context.Pool(workers, initializer=_init_worker,
                            initargs=(spec, eos, text_field, tokenizer if with_chat else None))
    finally:
        sys.modules["__main__"] = main


# ---------------------------------------------------------------------------
# Writing stores
# ---------------------------------------------------------------------------

class _StoreWriter:
    def __init__(self, final_path: str, item: sources.InputFile, text_field: str,
                 chat_settings: chat.ChatSettings | None = None):
        self.final_path, self.item, self.chat_settings = final_path, item, chat_settings
        self.tmp = f"{final_path}.tmp-{os.uname().nodename}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        names = ("tokens.u32", "lengths.u32", "digests.b16") + ((TRAINED_BITS,) if chat_settings else ())
        self.files = {name: open(os.path.join(self.tmp, name), "wb") for name in names}
        self.bits_hash = hashlib.blake2b(digest_size=16)
        self.bits_carry = np.zeros(0, dtype=bool)  # flags of the last chunk beyond a whole byte
        self.chat_counts = chat.new_counts()
        # Over lengths.u32 then digests.b16, as written: cheap (20 bytes a document) and checked at every open.
        self.lengths_hash, self.digests_hash = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
        self.tokens_crc = BlockCrc()
        self.docs = self.tokens = self.bad_count = self.lines = 0
        self.bad_examples: list[str] = []
        self.text_field = text_field

    def add(self, result, first_line: int, n_records: int) -> None:
        flat, lengths, digests, bad = result[:4]
        if self.chat_settings is not None:
            trained, counts = result[4:]
            self._write_bits(np.concatenate([self.bits_carry, trained]), final=False)
            for key, value in counts.items():
                self.chat_counts[key] += value
        self.files["tokens.u32"].write(flat.tobytes())
        self.tokens_crc.update(flat)
        self.files["lengths.u32"].write(lengths.tobytes())
        self.files["digests.b16"].write(digests)
        self.lengths_hash.update(lengths.tobytes())
        self.digests_hash.update(digests)
        self.docs += len(lengths)
        self.tokens += len(flat)
        self.lines = first_line + n_records - 1
        self.bad_count += len(bad)
        for number, reason in bad[: max(0, BAD_EXAMPLES - len(self.bad_examples))]:
            self.bad_examples.append(f"{self.item.path}:{number}: {reason}")

    def _write_bits(self, flags: np.ndarray, final: bool) -> None:
        whole = len(flags) if final else len(flags) - len(flags) % 8
        packed = np.packbits(flags[:whole], bitorder="little").tobytes()
        self.files[TRAINED_BITS].write(packed)
        self.bits_hash.update(packed)
        self.bits_carry = flags[whole:]

    def finish(self) -> Store:
        if self.chat_settings is not None:
            self._write_bits(self.bits_carry, final=True)
        for fh in self.files.values():
            fh.close()
        checksums = {"lengths.u32": self.lengths_hash.hexdigest(), "digests.b16": self.digests_hash.hexdigest()}
        meta = {"version": STORE_VERSION, "path": self.item.path, "size": self.item.size,
                "mtime_ns": self.item.mtime_ns, "format": self.item.format, "text_field": self.text_field,
                "lines": self.lines, "docs": self.docs, "tokens": self.tokens, "bad_lines": self.bad_count,
                "bad_examples": self.bad_examples, "checksums": checksums, "tokens_crc32": self.tokens_crc.record()}
        if self.chat_settings is not None:
            checksums[TRAINED_BITS] = self.bits_hash.hexdigest()
            meta["chat"] = {"train_on": self.chat_settings.train_on, "max_seq_length": self.chat_settings.max_seq_length,
                            "long_conversations": self.chat_settings.long_conversations, **self.chat_counts}
        with open(os.path.join(self.tmp, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
        if os.path.exists(self.final_path):  # written meanwhile by a preparer that did not share our lock
            shutil.rmtree(self.tmp)
        else:
            rename_durably(self.tmp, self.final_path)  # every file and the folder on disk, then the rename
        return Store.open(self.final_path)

    def abandon(self) -> None:
        for fh in self.files.values():
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def build_stores(missing: list[tuple], tokenizer, text_field: str, workers: int, progress=None) -> None:
    """Tokenize each (file, store path[, chat settings]) into its store, `workers` processes at once, results in
    order. A chat file's rows are rendered with the tokenizer's chat template (glmkit/data/chat.py).

    Chunks of the next file are dispatched while the last ones of the previous file are still being
    tokenized, so many small shards keep every worker busy too.
    """
    if not missing:
        return
    missing = [(entry[0], entry[1], entry[2] if len(entry) > 2 else None) for entry in missing]
    with_chat = any(settings is not None for _, _, settings in missing)
    pool = _start_pool(workers, tokenizer, tokenizer.eos_token_id, text_field, with_chat)
    in_flight = collections.deque()  # (job or None = the file is complete, writer, first line, records)
    window = 2 * workers + 1
    open_writers: list[_StoreWriter] = []
    try:
        for item, path, settings in missing:
            writer = _StoreWriter(path, item, text_field, settings)
            open_writers.append(writer)
            done_bytes = 0
            kind = "text" if settings is None else "chat"
            for chunk in sources.read_chunks(item, text_field, kind=kind):
                job = pool.apply_async(tokenize_chunk, (chunk.first_line, chunk.records, item.format == "parquet",
                                                        settings))
                in_flight.append((job, writer, chunk.first_line, len(chunk.records)))
                if progress is not None:
                    progress.update(chunk.consumed_bytes - done_bytes)
                    done_bytes = chunk.consumed_bytes
                while len(in_flight) >= window:
                    _collect(in_flight, open_writers)
            in_flight.append((None, writer, 0, 0))
            if progress is not None:
                progress.update(item.size - done_bytes)
        while in_flight:
            _collect(in_flight, open_writers)
        pool.close()
        pool.join()
    finally:
        for writer in open_writers:
            writer.abandon()
        pool.terminate()


def _collect(in_flight, open_writers: list[_StoreWriter]) -> None:
    job, writer, first_line, n_records = in_flight.popleft()
    if job is None:
        writer.finish()
        open_writers.remove(writer)
    else:
        writer.add(job.get(), first_line, n_records)
