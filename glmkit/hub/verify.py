"""Is a model folder whole? config, tokenizer and every shard's header checked without loading weights
(`download_model.py --verify-only`), and with `--deep` every file hashed against the Hub's listing.

The trainer runs the same header checks before it loads anything (glmkit.model.load.check_model_dir).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from glmkit.hub import shards
from glmkit.hub.download import (
    ARCHITECTURE_OF_MODEL_TYPE,
    DEFAULT_TIMEOUT,
    HF_LOCAL_CACHE,
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    HubError,
    bounded_requests,
    explain_hub_error,
    fetch_remote_repo,
    human_size,
)
from glmkit.hub.mtp_layout import mtp_problem

# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------

def verify_model_dir(model_dir: str, rerun: str = "download_model.py") -> list[str]:
    """Check a checkpoint folder without loading weights; return one line per problem (empty: usable).

    Every line names the file and what to do; `rerun` is the command that (re)creates the folder.
    """
    return [f"{path}: {problem}" for path, problem in _problems(model_dir, rerun)]


def _problems(model_dir: str, rerun: str) -> list[tuple[str, str]]:
    """(file, what is wrong and what to do) for each problem in `model_dir`."""
    if not os.path.isdir(model_dir):
        return [(model_dir, f"folder does not exist; run {rerun} to create it")]
    problems = _check_config(model_dir, rerun) + _check_tokenizer(model_dir, rerun) + _check_weights(model_dir, rerun)
    return problems or _check_mtp(model_dir)


def _check_config(model_dir: str, rerun: str) -> list[tuple[str, str]]:
    path = os.path.join(model_dir, "config.json")
    config, problem = _load_json(path, rerun)
    if problem:
        return [(path, problem)]
    if not isinstance(config, dict):
        return [(path, f"not a JSON object; delete it and rerun {rerun}")]
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if ARCHITECTURE_OF_MODEL_TYPE.get(model_type) not in architectures:
        supported = ", ".join(f"{arch} (model_type {kind})" for kind, arch in ARCHITECTURE_OF_MODEL_TYPE.items())
        return [(path, f"architectures {architectures} / model_type {model_type!r} is not supported; this kit "
                 f"trains {supported}: point model.name_or_path at a GLM-4.5/4.6/4.7 MoE or GLM-4.7-Flash "
                 "checkpoint")]
    return []


def architecture_of(model_dir: str) -> str:
    """The architecture config.json names (for messages), the first the kit trains if it names several."""
    config = _load_json(os.path.join(model_dir, "config.json"), "")[0]
    names = config.get("architectures") if isinstance(config, dict) else None
    return next((name for name in names or [] if name in ARCHITECTURE_OF_MODEL_TYPE.values()), "GLM")


def _check_tokenizer(model_dir: str, rerun: str) -> list[tuple[str, str]]:
    problems = []
    present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, name))]
    if not present:
        problems.append((os.path.join(model_dir, TOKENIZER_FILES[0]),
                         f"missing (neither {' nor '.join(TOKENIZER_FILES)} is there); rerun {rerun} to fetch it"))
    elif present[0].endswith(".json"):
        path = os.path.join(model_dir, present[0])
        problems += [(path, p) for p in [_load_json(path, rerun)[1]] if p]
    elif os.path.getsize(os.path.join(model_dir, present[0])) == 0:
        problems.append((os.path.join(model_dir, present[0]), f"empty; delete it and rerun {rerun}"))
    path = os.path.join(model_dir, "tokenizer_config.json")
    problem = _load_json(path, rerun)[1]
    return problems + ([(path, problem)] if problem else [])


def _check_weights(model_dir: str, rerun: str) -> list[tuple[str, str]]:
    problems = []
    for path, problem in check_weights(model_dir):
        fix = f"rerun {rerun} to fetch it" if not os.path.exists(path) else f"delete it and rerun {rerun}"
        problems.append((path, f"{problem}; {fix}"))
    return problems


def _check_mtp(model_dir: str) -> list[tuple[str, str]]:
    """config.json and the weights agree about the MTP layer (checked once everything else is whole)."""
    path = os.path.join(model_dir, "config.json")
    config, _ = _load_json(path, "")
    problem = mtp_problem(config, tensor_names(model_dir))
    return [(path, problem)] if problem else []


def tensor_names(model_dir: str) -> list[str]:
    """Every tensor name of a checkpoint whose index and shards are whole: the index's, or the one file's header."""
    by_shard, _ = shard_map(model_dir)
    if list(by_shard.values()) == [[]]:  # one unsharded file: its header lists the tensors
        (single,) = by_shard
        header, _, _ = shards.read_header(os.path.join(model_dir, single))
        return [name for name in header or {} if name != "__metadata__"]
    return [name for names in by_shard.values() for name in names]


def check_weights(model_dir: str) -> list[tuple[str, str]]:
    """(file, what is wrong) for the index and every shard it names, from headers alone (seconds for 220 GB).

    The trainer's loader runs this before loading anything; download_model.py --verify-only adds what to do.
    """
    weights, problem = shard_map(model_dir)
    if problem:
        return [problem]
    problems = []
    for shard in sorted(weights):
        path = os.path.join(model_dir, shard)
        if not os.path.isfile(path):
            problems.append((path, f"missing (listed in {INDEX_FILE})"))
            continue
        problem = shards.check_file(path, weights[shard])
        if problem:
            problems.append((path, problem))
    return problems


def shard_map(model_dir: str) -> tuple[dict[str, list[str]], Optional[tuple[str, str]]]:
    """({shard file: tensors the index puts in it}, None) or ({}, (index file, what is wrong))."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if not os.path.isfile(index_path) and os.path.isfile(os.path.join(model_dir, SINGLE_FILE)):
        return {SINGLE_FILE: []}, None  # an unsharded checkpoint: the one file must hold itself together
    if not os.path.isfile(index_path):
        return {}, (index_path, "missing")
    try:
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, (index_path, f"not valid JSON ({exc.__class__.__name__})")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) and v for v in weight_map.values()):
        return {}, (index_path, "has no valid weight_map (tensor name -> shard file in this folder)")
    # Every shard a file of this very folder: `../x.safetensors` or `/abs/x` would read weights from elsewhere.
    elsewhere = next(((t, v) for t, v in weight_map.items() if os.path.basename(v) != v or v in (".", "..")), None)
    if elsewhere:
        return {}, (index_path, f"maps {elsewhere[0]} to {elsewhere[1]!r}, which is not a file in this folder; a "
                                f"weight_map names shard files beside the index only")
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(tensor)
    return by_shard, None


def check_safetensors_file(path: str, expected_tensors=()) -> Optional[str]:
    """What is wrong with one safetensors file, from its header alone (see glmkit.hub.shards.check_file)."""
    return shards.check_file(path, expected_tensors)


# ---------------------------------------------------------------------------
# Deep verification: hash every file against the Hub's listing
# ---------------------------------------------------------------------------

def downloaded_commit(model_dir: str) -> Optional[str]:
    """The commit snapshot_download recorded for this folder's files, if they all agree (else None).

    Its `.cache/huggingface/download/<file>.metadata` files start with the commit hash; comparing against
    that commit (not the branch, which may have moved since) is what makes the deep check fair.
    """
    root = os.path.join(model_dir, HF_LOCAL_CACHE, "download")
    commits = set()
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if name.endswith(".metadata"):
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as fh:
                        commits.add(fh.readline().strip())
                except (OSError, UnicodeDecodeError):
                    continue
    return commits.pop() if len(commits) == 1 else None


def deep_verify(model_dir: str, repo_id: str, revision: str, *, endpoint: Optional[str] = None,
                timeout: float = DEFAULT_TIMEOUT, skip: frozenset = frozenset(),
                rerun: str = "download_model.py") -> list[str]:
    """Hash every local file the Hub lists and compare with the Hub's sha256 / git blob id.

    Raises HubError when the listing can't be had (the deep check needs the Hub). Files in `skip`
    (already reported by the header check) and files not on disk are left to the other checks.
    """
    if os.path.isdir(repo_id):
        raise HubError(f"--deep compares with the Hub, but model.name_or_path is a local folder ({repo_id}); "
                       "drop --deep")
    commit = downloaded_commit(model_dir) or revision
    bounded_requests(timeout)
    try:
        remote = fetch_remote_repo(repo_id, commit, endpoint)
    except Exception as exc:
        raise HubError("--deep needs the Hub's file hashes: "
                       + explain_hub_error(exc, repo_id, commit, endpoint, timeout)) from None
    todo = [(name, os.path.join(model_dir, name)) for name in sorted(remote.hashes)]
    todo = [(name, path) for name, path in todo if os.path.isfile(path) and path not in skip]
    total = sum(os.path.getsize(path) for _, path in todo)
    print(f"--deep: hashing {len(todo)} files ({human_size(total)}) against {repo_id} @ {remote.commit[:12]}",
          flush=True)
    problems = []
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        for name, path in todo:
            kind, expected = remote.hashes[name]
            actual = (shards.file_sha256 if kind == "sha256" else shards.git_blob_sha1)(path, bar.update)
            if actual != expected:
                problems.append(f"{path}: content differs from the Hub's ({kind} {actual[:12]}..., the Hub has "
                                f"{expected[:12]}... at commit {remote.commit[:12]}); delete it and rerun {rerun}")
    return problems


def _load_json(path: str, rerun: str):
    """(parsed JSON, None) or (None, what is wrong with the file at `path` and what to do)."""
    if not os.path.isfile(path):
        return None, f"missing; rerun {rerun} to fetch it"
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh), None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"not valid JSON ({exc.__class__.__name__}); delete it and rerun {rerun}"
