"""Is a safetensors shard intact? Checks from the header alone, and a content hash for the deep check.

Layout of a safetensors file: 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping each
tensor name to {dtype, shape, data_offsets: [begin, end)} (plus an optional "__metadata__" of strings),
then the data. The tensors' byte ranges tile the data exactly: no gaps, no overlaps, ending at the
file's end. So the header alone shows random bytes, a truncation, extra bytes or an edited header,
without reading the (multi-GB) data; damage inside the data only a hash finds (`file_sha256`).

Both download_model.py --verify-only and the trainer's loader ask this module, so the rule lives here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable, Optional, Sequence

# safetensors itself refuses headers above 100 MB; anything bigger is garbage, not a header.
MAX_HEADER_BYTES = 100_000_000
# Bits per element for every dtype safetensors 0.8 knows (F4 and F6 pack several elements per byte).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
HASH_CHUNK = 8 << 20


def read_header(path: str) -> tuple[Optional[dict], int, Optional[str]]:
    """(header dict, header length, None) or (None, 0, what is wrong) from the first bytes of `path`."""
    size = os.path.getsize(path)
    if size == 0:
        return None, 0, "empty file"
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            return None, 0, f"only {size} bytes, too short for a safetensors header"
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES:
            return None, 0, f"not a safetensors file (header length {header_len} is implausible)"
        if 8 + header_len > size:
            return None, 0, f"truncated: {size} bytes, but the header alone needs {8 + header_len}"
        raw = fh.read(header_len)
    if not raw.startswith(b"{"):
        return None, 0, "not a safetensors file (the header is not a JSON object)"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, 0, "safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return None, 0, "safetensors header is not a JSON object"
    return header, header_len, None


def _entry_problem(name: str, entry) -> tuple[Optional[tuple[int, int]], Optional[str]]:
    """((begin, end), None) for a well-formed tensor entry, or (None, what is wrong)."""
    if not isinstance(entry, dict):
        return None, f"safetensors header entry {name!r} is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        return None, f"safetensors header entry {name!r} has no valid data_offsets"
    if dtype not in DTYPE_BITS:
        return None, f"tensor {name!r} has unknown dtype {dtype!r}"
    if not (isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        return None, f"tensor {name!r} has no valid shape"
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        return None, (f"tensor {name!r} ({dtype} {shape}) needs {bits / 8:g} bytes but its data_offsets "
                      f"span {offsets[1] - offsets[0]}")
    return (offsets[0], offsets[1]), None


def check_file(path: str, expected_tensors: Sequence[str] = ()) -> Optional[str]:
    """What is wrong with the safetensors file at `path` (from its header alone), or None.

    Checks: a plausible header length, a JSON object header, each tensor's dtype x shape equal to its
    byte range, the ranges tiling the data from 0 to the file's end, and every name in
    `expected_tensors` (what the index puts in this shard) present.
    """
    header, header_len, problem = read_header(path)
    if problem:
        return problem
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        span, problem = _entry_problem(name, entry)
        if problem:
            return problem
        ranges.append((span, name))
    ranges.sort()
    position = 0
    for (begin, end), name in ranges:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap of {begin - position} bytes"
            return f"tensor {name!r}'s data_offsets [{begin}, {end}] {what}"
        position = end
    size, expected = os.path.getsize(path), 8 + header_len + position
    if size < expected:
        return f"truncated: {size} bytes, the header says {expected}"
    if size > expected:
        return f"{size} bytes, but the header accounts for only {expected}"
    missing = [t for t in expected_tensors if t not in header]
    if missing:
        return f"lacks {len(missing)} tensor(s) that the index puts there (e.g. {missing[0]})"
    return None


def file_sha256(path: str, progress: Optional[Callable[[int], None]] = None) -> str:
    """Hex sha256 of the file: the Hub's LFS oid for weight files."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def git_blob_sha1(path: str, progress: Optional[Callable[[int], None]] = None) -> str:
    """Hex git blob id of the file: the Hub's oid for small (non-LFS) files such as config.json."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()
