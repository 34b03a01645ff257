"""Training inputs: what `paths.data_path` names, and streaming readers over those files.

`paths.data_path` is a file, a folder (the supported files inside, recursively, in sorted
order), a glob, or a list of sources with weights. Supported formats are `.jsonl`,
`.jsonl.gz`, `.jsonl.zst` (one JSON object per line) and `.parquet`, each with the
`training.text_field` column, or for a source of `format: chat` the `messages` column (and
optionally `tools`; glmkit/data/chat.py reads those rows). Files are read as a stream of chunks of raw lines (or column
values), never whole; line numbers count lines of the decompressed text, so a bad line is
named `file:line` inside a compressed file too. Anything wrong with a file as a whole
(nothing matched, an unknown extension, compressed data under a `.jsonl` name, a corrupt or
truncated archive, a parquet file without the column) is a DataError naming the file and the fix.
"""

from __future__ import annotations

import errno
import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

MESSAGES_FIELD, TOOLS_FIELD = "messages", "tools"  # a chat row's fields (glmkit/data/chat.py)
FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "gzip", ".jsonl.zst": "zstd", ".parquet": "parquet"}
SUPPORTED = ", ".join(FORMATS)
GZIP_MAGIC, ZSTD_MAGIC, PARQUET_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PAR1"
CHUNK_BYTES = 2 * 2**20  # raw text per chunk handed to a tokenizer worker


class DataError(ValueError):
    """The corpus can't be used; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    mtime_ns: int
    format: str  # jsonl | gzip | zstd | parquet

    def identity(self) -> list:
        return [self.path, self.size, self.mtime_ns]


@dataclass
class Source:
    spec: str           # the path, folder or glob as configured (resolved against the config's folder)
    weight: float       # passes per epoch; a fraction takes a deterministic subset of the documents
    files: list[InputFile]
    format: str = "text"                # text | chat (glmkit/data/chat.py)
    train_on: str = "assistant"         # chat: assistant | last_assistant | all
    long_conversations: str = "split"   # chat: split | drop


@dataclass
class Chunk:
    """Consecutive records of one file: raw lines (JSONL) or column values (parquet)."""
    first_line: int      # 1-based line (or row) number of records[0]
    records: list        # bytes lines, or str/None values
    consumed_bytes: int  # bytes of the file on disk read so far (for the progress bar)


def configured_sources(data_path) -> list[Source]:
    """The sources of paths.data_path (a string, or a list of DataSource), files not yet resolved."""
    if isinstance(data_path, str):
        return [Source(data_path, 1.0, [])]
    return [Source(s.path, s.weight, [], getattr(s, "format", "text"), getattr(s, "train_on", "assistant"),
                   getattr(s, "long_conversations", "split")) for s in data_path]


def describe(data_path) -> str:
    """paths.data_path in one line, for messages and the launcher."""
    return ", ".join(s.spec + (f" (x{s.weight:g})" if s.weight != 1.0 else "") + (" (chat)" if s.format == "chat" else "")
                     for s in configured_sources(data_path))


def file_format(path: str) -> str | None:
    name = path.lower()
    for suffix, kind in FORMATS.items():
        if name.endswith(suffix):
            return kind
    return None


def resolve_sources(data_path, text_field: str) -> list[Source]:
    """Every configured source with its files, checked as far as possible without reading them through."""
    sources = []
    claimed: dict[str, int] = {}  # real path of each file -> the index of the source that lists it
    for index, source in enumerate(configured_sources(data_path)):
        spec, weight = source.spec, source.weight
        if not weight > 0:  # the config refuses it at load; a caller building sources by hand gets the same rule
            raise DataError(f"{spec}: source weight {weight} must be > 0 (paths.data_path)")
        files = [_input_file(path) for path in _matching_paths(spec)]
        for item in files:
            check_file(item, text_field, source.format)
            first = claimed.setdefault(os.path.realpath(item.path), index)
            if first != index:
                raise _listed_twice(item.path, (sources[first].spec, sources[first].weight), (spec, weight),
                                    first, index)
        source.files = files
        sources.append(source)
    return sources


def _listed_twice(path: str, first: tuple[str, float], second: tuple[str, float], i: int, j: int) -> DataError:
    """Two sources that share a file (the same path twice, or a folder and a file inside it) would read it
    with the sum of their weights, which is rarely what was meant: refuse, stating that sum."""
    (spec_i, weight_i), (spec_j, weight_j) = first, second
    relation = "is the same source as" if spec_i == spec_j else "overlaps"
    return DataError(f"paths.data_path[{j}] ({spec_j}) {relation} paths.data_path[{i}] ({spec_i}): both take "
                     f"{path}, which would count {weight_i:g} + {weight_j:g} = {weight_i + weight_j:g} passes per "
                     f"epoch; list each file in one source and give that source the weight you mean")


def _matching_paths(spec: str) -> list[str]:
    if glob.has_magic(spec):
        matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{spec}: the glob matches no file; fix paths.data_path (supported: {SUPPORTED})")
        for path in matches:
            _require_supported(path)
        return matches
    if os.path.isdir(spec):
        found = []

        def unreadable(exc: OSError):
            raise DataError(f"{exc.filename}: the folder cannot be read ({exc.strerror}); fix its permissions "
                            f"or leave it out of paths.data_path")

        for root, dirs, names in os.walk(spec, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, n) for n in names if not n.startswith(".") and file_format(n)]
        if not found:
            raise DataError(f"{spec}: the folder holds no {SUPPORTED} file; fix paths.data_path")
        return sorted(found)
    if os.path.isfile(spec):
        _require_supported(spec)
        return [spec]
    what = "exists but is not a regular file" if os.path.exists(spec) else _missing_reason(spec)
    raise DataError(f"{spec}: {what}; set paths.data_path to a file, folder or glob of {SUPPORTED} "
                    f"(python -m glmkit.demo.corpus writes a demo corpus)")


def _require_supported(path: str) -> None:
    if file_format(path) is None:
        raise DataError(f"{path}: unsupported extension; rename or convert it to one of {SUPPORTED}, "
                        f"or leave it out of paths.data_path")


def _missing_reason(path: str) -> str:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop (a link that leads back to itself)"
        if os.path.islink(path):
            return "a symlink to nothing"
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"cannot be read ({exc.strerror})"
    return "no such file or folder"


def _unreadable(path: str, exc: OSError) -> DataError:
    reason = (_missing_reason(path) if exc.errno in (errno.ELOOP, errno.ENOENT)
              else f"cannot be read ({exc.strerror})")
    return DataError(f"{path}: {reason}; fix it (permissions, the link) or leave it out of paths.data_path")


def _input_file(path: str) -> InputFile:
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return InputFile(os.path.abspath(path), stat.st_size, stat.st_mtime_ns, file_format(path))


def check_file(item: InputFile, text_field: str, kind: str = "text") -> None:
    """The file's leading bytes match its name, and a parquet file has the text column (chat: `messages`)."""
    try:
        with open(item.path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise _unreadable(item.path, exc) from None
    if item.format == "jsonl":
        for magic, kind, suffix in ((GZIP_MAGIC, "gzip", ".gz"), (ZSTD_MAGIC, "zstd", ".zst")):
            if head.startswith(magic):
                raise DataError(f"{item.path}: this file is {kind}-compressed but named .jsonl; rename it to "
                                f"{os.path.basename(item.path)}{suffix} so it is decompressed")
        return
    expected = {"gzip": GZIP_MAGIC, "zstd": ZSTD_MAGIC, "parquet": PARQUET_MAGIC}[item.format]
    if item.size and not head.startswith(expected):
        hint = "rename it to .jsonl" if head[:1] in (b"{", b"[", b" ", b"\n") else "re-create or re-download it"
        raise DataError(f"{item.path}: not {item.format} data despite its name; {hint}")
    if item.format == "parquet":
        _check_parquet_column(item.path, text_field, kind)


def _check_parquet_column(path: str, text_field: str, kind: str = "text") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable parquet file ({exc}); re-create or re-download it") from None
    if kind == "chat":
        if MESSAGES_FIELD not in schema.names:
            raise DataError(f"{path}: no column {MESSAGES_FIELD!r} (columns: {', '.join(schema.names)}); a chat "
                            f"source needs a {MESSAGES_FIELD!r} column of [{{role, content}}] lists, or format: text")
        if not pa.types.is_list(schema.field(MESSAGES_FIELD).type) and \
                not pa.types.is_large_list(schema.field(MESSAGES_FIELD).type):
            raise DataError(f"{path}: column {MESSAGES_FIELD!r} holds {schema.field(MESSAGES_FIELD).type}, not a "
                            f"list of messages; store each conversation as a list of {{role, content}} structs")
        return
    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); set "
                        f"training.text_field or write the text into a {text_field!r} column")
    kind = schema.field(text_field).type
    # Dictionary-encoded strings (pandas categoricals, `dictionary_encode()`) read back as str values too.
    values = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(values) or pa.types.is_large_string(values) or pa.types.is_string_view(values)):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not text; store the documents as strings")


# ---------------------------------------------------------------------------
# Streaming readers
# ---------------------------------------------------------------------------

def read_chunks(item: InputFile, text_field: str, chunk_bytes: int = CHUNK_BYTES, kind: str = "text") -> Iterator[Chunk]:
    """The file as a stream of chunks of about chunk_bytes of text; a damaged archive is a DataError.

    A chat parquet file's records are row mappings ({"messages": ..., "tools": ...}), not column values."""
    if item.format == "parquet":
        yield from (_parquet_chat_chunks(item, chunk_bytes) if kind == "chat" else
                    _parquet_chunks(item, text_field, chunk_bytes))
        return
    with open(item.path, "rb") as raw:
        stream = _decompressed(raw, item.format)
        line_number, records, size = 1, [], 0
        try:
            for line in stream:
                records.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    yield Chunk(line_number, records, raw.tell())
                    line_number, records, size = line_number + len(records), [], 0
        except (EOFError, OSError, zlib.error) as exc:
            raise _damaged(item, line_number + len(records), exc) from None
        except Exception as exc:  # zstandard.ZstdError derives from Exception only
            if type(exc).__name__ != "ZstdError":
                raise
            raise _damaged(item, line_number + len(records), exc) from None
        if records:
            yield Chunk(line_number, records, raw.tell())


def _decompressed(raw, kind: str):
    if kind == "gzip":
        return io.BufferedReader(_Read1(gzip.GzipFile(fileobj=raw, mode="rb")), buffer_size=1 << 20)
    if kind == "zstd":
        return io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 20)
    return raw


class _Read1(io.RawIOBase):
    """A buffered stream as a raw one that hands over what one read1 returns.

    Wrapping GzipFile directly, a 1 MiB buffer fill is a `read(1 MiB)`, which loops until the MiB is
    full: a truncated archive then raised before any of the lines decoded in that MiB were seen, and
    the break was reported "near line 1". With read1 each fill returns what was decoded so far, so
    every line before the break is delivered and the break is located to within one fill.
    """

    def __init__(self, stream):
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read1(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _ZstdFrames(io.RawIOBase):
    """A .zst file (one frame or several, as pzstd writes) as a raw stream of its decompressed bytes.

    zstandard's own stream reader returns a truncated file's first part without complaint; here a
    file that ends inside a frame raises EOFError, as gzip does.
    """

    def __init__(self, raw):
        import zstandard

        self.raw, self.zstandard = raw, zstandard
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.fed = False  # bytes of the current frame were fed
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            compressed = self.raw.read(1 << 20)
            if not compressed:
                if self.fed and not self.frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self.pending = self._feed(compressed)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def _feed(self, compressed: bytes) -> bytes:
        out = []
        while compressed:
            if self.frame.eof:  # the next frame starts in what is left
                self.frame, self.fed = self.zstandard.ZstdDecompressor().decompressobj(), False
            out.append(self.frame.decompress(compressed))
            self.fed = True
            compressed = self.frame.unused_data if self.frame.eof else b""
        return b"".join(out)


def _damaged(item: InputFile, line: int, exc: BaseException) -> DataError:
    kind = {"gzip": "gzip", "zstd": "zstd"}.get(item.format, item.format)
    return DataError(f"{item.path}: corrupt or truncated {kind} data near line {line} ({exc}); "
                     f"re-download or re-compress the file")


def _parquet_chunks(item: InputFile, text_field: str, chunk_bytes: int) -> Iterator[Chunk]:
    def sized_texts(table):
        return ((value, len(value) if value else 0) for value in table.column(text_field).to_pylist())

    return _parquet_record_chunks(item, chunk_bytes, lambda parquet: [text_field], sized_texts)


def _parquet_chat_chunks(item: InputFile, chunk_bytes: int) -> Iterator[Chunk]:
    def columns(parquet):
        return [c for c in (MESSAGES_FIELD, TOOLS_FIELD) if c in parquet.schema_arrow.names]

    def sized_conversations(table):
        per_row = table.nbytes / max(1, table.num_rows)  # the chunk size in bytes of Arrow data, pro rata
        return ((record, per_row) for record in table.to_pylist())

    return _parquet_record_chunks(item, chunk_bytes, columns, sized_conversations)


def _parquet_record_chunks(item: InputFile, chunk_bytes: int, columns_of, sized_records) -> Iterator[Chunk]:
    """A parquet file's records in chunks of about `chunk_bytes`: `columns_of(file)` names the columns read,
    `sized_records(row group table)` gives each record with its size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 1
    try:
        parquet = pq.ParquetFile(item.path)
        columns, groups = columns_of(parquet), parquet.metadata.num_row_groups
        records, size = [], 0
        for group in range(groups):
            # One row group at a time; its compressed size, pro rata, drives the progress bar.
            table = parquet.read_row_group(group, columns=columns)
            for record, record_size in sized_records(table):
                records.append(record)
                size += record_size
                if size >= chunk_bytes:
                    yield Chunk(row, records, item.size * (group + 1) // groups)
                    row, records, size = row + len(records), [], 0
            del table
        if records:
            yield Chunk(row, records, item.size)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{item.path}: corrupt parquet data near row {row} ({exc}); re-create or re-download it") from None


# ---------------------------------------------------------------------------
# One record -> a document, or the reason it is a bad line
# ---------------------------------------------------------------------------

def parse_line(line: bytes, text_field: str) -> tuple[str | None, str | None]:
    """(document, None), (None, reason), or (None, None) for a blank line."""
    if not line.strip():
        return None, None
    try:
        record = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg})"
    if not isinstance(record, dict) or text_field not in record:
        return None, f"missing field {text_field!r}"
    return check_text(record[text_field], text_field)


def parse_object(line: bytes) -> tuple[dict | None, str | None]:
    """A JSONL line as a mapping (a chat row), (None, reason), or (None, None) for a blank line."""
    if not line.strip():
        return None, None
    try:
        record = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    return record, None


def check_text(text, text_field: str) -> tuple[str | None, str | None]:
    if text is None:
        return None, f"field {text_field!r} is null"
    if not isinstance(text, str):
        return None, f"field {text_field!r} is not a string"
    if not text.strip():
        return None, f"field {text_field!r} is empty"
    return text, None


def utf8(text: str, text_field: str) -> tuple[bytes | None, str | None]:
    """The document's UTF-8 bytes, or why it has none: a lone surrogate from a \\ud800-style escape."""
    try:
        return text.encode("utf-8"), None
    except UnicodeEncodeError as exc:
        return None, (f"field {text_field!r} holds an unpaired surrogate {text[exc.start]!r} at character "
                      f"{exc.start} (a lone \\ud800-\\udfff escape is not valid Unicode)")
