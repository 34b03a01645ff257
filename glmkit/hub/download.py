"""Get a GLM checkpoint (GLM-4.5-Air, 4.5, 4.6, 4.7, 4.7-Flash) from the Hugging Face Hub into `paths.model_dir`,
and check that what is there is usable.

Downloading is `huggingface_hub.snapshot_download(local_dir=...)`. What a rerun reuses, per the installed
huggingface_hub 2.4 source:

- Finished files are kept. A file whose `.cache/huggingface/download/<file>.metadata` records the commit
  we ask for is skipped without any network call, so a rerun only fetches what is still missing.
- A connection dropped mid-file is resumed within the same run: `http_get` retries up to 5 times with
  `Range: bytes=<received>-`.
- A partial file is NOT resumed across runs: 2.4 downloads into a uniquely named `*.incomplete` file
  and deletes it when the download fails (huggingface_hub PR #4228), so an interrupted shard restarts.

Before downloading we list the repo (the same two API calls snapshot_download makes), to pin the commit,
to check free disk space against the bytes still missing, and to drop local files whose size differs
from the Hub's (a truncated shard would otherwise be kept forever: the skip above trusts the metadata).

Every request gives up after `timeout` seconds without an answer (`bounded_requests`): huggingface_hub's
shared httpx client has no timeout, and several calls (`model_info`, `list_repo_tree`) pass `timeout=None`
explicitly, so neither HF_HUB_ETAG_TIMEOUT nor HF_HUB_DOWNLOAD_TIMEOUT covers them; a request hook on the
client does. huggingface_hub's own retries stay (at most 5 per file, 1 s apart), so a Hub that accepts
connections and never answers ends the command after about `timeout` (our listing is not retried, and the
user-agent telemetry request that would wait first is switched off), and one
that stops sending a file gives up on it after about 6 x `timeout`.

Every failure the user can act on becomes a `HubError` holding one line: what happened and what to do.
The token is never printed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

# What the kit trains, as config.json names it: GLM-4.5-Air, GLM-4.5, GLM-4.6 and GLM-4.7 (transformers' glm4_moe), and
# GLM-4.7-Flash (glm4_moe_lite: the same MoE half, multi-head latent attention). Each architecture with its model type.
ARCHITECTURE_OF_MODEL_TYPE = {"glm4_moe": "Glm4MoeForCausalLM", "glm4_moe_lite": "Glm4MoeLiteForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURE_OF_MODEL_TYPE)
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURE_OF_MODEL_TYPE.values())
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # unsharded checkpoints (small models) have no index
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # either one, plus tokenizer_config.json
GB = 1e9  # decimal, as the Hub shows sizes
# Used only when the Hub's file listing can't be had: GLM-4.5-Air in bf16 is about 220 GB; the repos the kit knows
# by name have their own (bf16, every parameter with the MTP layer and its copies: 2 bytes each, rounded up).
FALLBACK_REPO_BYTES = 220 * GB
KNOWN_REPO_BYTES = {"zai-org/GLM-4.7-Flash": 63 * GB, "zai-org/GLM-4.5": 720 * GB, "zai-org/GLM-4.6": 720 * GB,
                    "zai-org/GLM-4.7": 720 * GB}
# Keep some room beyond the weights so the disk is not filled to the last byte (logs, checkpoints, the OS).
MARGIN_BYTES = 1 * GB
MARGIN_FRACTION = 0.02
# huggingface_hub keeps its per-file metadata and in-flight downloads here, inside local_dir.
HF_LOCAL_CACHE = os.path.join(".cache", "huggingface")
# Seconds a request may wait for an answer before giving up (download_model.py --timeout).
DEFAULT_TIMEOUT = 60.0


class HubError(Exception):
    """A failure explained in one line: what went wrong and what to do."""


@dataclass
class RemoteRepo:
    commit: str  # the commit the revision points at now; we download exactly this one
    sizes: dict[str, int]  # repo path -> size in bytes
    gated: bool
    # repo path -> ("sha256", LFS oid) for weights, ("git-sha1", blob id) for small files
    hashes: dict[str, tuple[str, str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Bounded requests
# ---------------------------------------------------------------------------

def bounded_requests(timeout: float) -> None:
    """Make every huggingface_hub request give up after `timeout` seconds without an answer.

    Applies to connecting, each read and each write of every request the shared client sends, whatever
    timeout (often None) the calling function asked for.
    """
    import httpx2
    from huggingface_hub import constants, set_client_factory

    # Not re-exported, but it is the client huggingface_hub would build (its request hook, redirects);
    # requirements.txt pins 2.4.0 and tests/test_download.py's timeout tests fail if this moves.
    from huggingface_hub.utils._http import default_client_factory

    limit = httpx2.Timeout(timeout)

    def cap_timeout(request) -> None:
        request.extensions = {**request.extensions, "timeout": limit.as_dict()}

    def client_factory():
        client = default_client_factory()
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), cap_timeout]}
        return client

    # The documented knobs, for the calls that read them (the hook above has the last word anyway).
    constants.HF_HUB_ETAG_TIMEOUT = constants.HF_HUB_DOWNLOAD_TIMEOUT = max(1, round(timeout))
    # Building the user agent, huggingface_hub 2.4 first fetches `<endpoint>/api/agent-harnesses` (telemetry,
    # its own request): a silent Hub then made the command wait twice `timeout` while the message says once.
    # HF_HUB_DISABLE_TELEMETRY is the documented switch for it; nothing the kit needs goes through it.
    constants.HF_HUB_DISABLE_TELEMETRY = True
    set_client_factory(client_factory)


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------

def download(repo_id: str, revision: str, model_dir: str, *, min_free_gb: Optional[float] = None,
             endpoint: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Download (or finish downloading) `repo_id` at `revision` into `model_dir`; raise HubError on failure."""
    from huggingface_hub import snapshot_download

    bounded_requests(timeout)

    if os.path.isdir(repo_id):
        raise HubError(f"model.name_or_path is a local folder ({repo_id}); there is nothing to download: "
                       "set paths.model_dir to it and run download_model.py --verify-only")
    try:
        remote = fetch_remote_repo(repo_id, revision, endpoint)
    except Exception as exc:
        if not _is_server_trouble(exc):
            raise HubError(explain_hub_error(exc, repo_id, revision, endpoint, timeout)) from None
        # The listing failed but the Hub may still serve files: go on with the size estimate.
        print(f"warning: could not list {repo_id} ({_first_line(exc)}); "
              f"assuming {fallback_repo_bytes(repo_id) / GB:.0f} GB for the disk-space check", flush=True)
        remote = None

    if remote is not None and remote.gated and _token() is None:
        raise HubError(_gated_message(repo_id, endpoint, have_token=False))
    if remote is not None:
        for name in drop_mismatched_files(model_dir, remote.sizes):
            print(f"{name}: size differs from the Hub's; fetching it again", flush=True)

    check_disk_space(model_dir, remote, min_free_gb, repo_id)
    # Passing the commit (not the branch) makes every file come from the snapshot we sized above.
    pinned = remote.commit if remote is not None else revision
    commit_note = f" (commit {pinned[:12]})" if remote is not None else ""
    print(f"downloading {repo_id} @ {revision}{commit_note} into {model_dir}", flush=True)
    try:
        snapshot_download(repo_id, revision=pinned, local_dir=model_dir, endpoint=endpoint,
                          etag_timeout=timeout)
    except Exception as exc:  # KeyboardInterrupt passes through to the CLI
        raise HubError(explain_hub_error(exc, repo_id, revision, endpoint, timeout)) from None


def fetch_remote_repo(repo_id: str, revision: str, endpoint: Optional[str] = None) -> RemoteRepo:
    """The commit `revision` points at, and the size and hash of every file in it (raises huggingface_hub errors).

    The recursive tree listing carries what the Hub's file metadata does: `lfs.sha256` for LFS files
    (the weights) and the git blob id for the rest.
    """
    from huggingface_hub import HfApi, RepoFile

    api = HfApi(endpoint=endpoint)
    info = api.model_info(repo_id, revision=revision)  # GET /api/models/{repo}/revision/{rev}
    tree = api.list_repo_tree(repo_id, revision=info.sha, recursive=True)  # GET /api/models/{repo}/tree/{sha}
    files = [entry for entry in tree if isinstance(entry, RepoFile)]
    hashes = {f.path: ("sha256", f.lfs.sha256) if f.lfs is not None else ("git-sha1", f.blob_id) for f in files}
    return RemoteRepo(commit=info.sha, sizes={f.path: f.size for f in files}, gated=bool(info.gated), hashes=hashes)


def drop_mismatched_files(model_dir: str, sizes: dict[str, int]) -> list[str]:
    """Delete local files whose size differs from the Hub's, so the download fetches them again.

    snapshot_download skips a file when its metadata names the right commit, without looking at the
    bytes; a file truncated or damaged after the download would otherwise never be repaired.
    """
    dropped = []
    for name, size in sizes.items():
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and os.path.getsize(path) != size:
            os.remove(path)
            dropped.append(name)
    return dropped


def bytes_still_needed(model_dir: str, sizes: dict[str, int]) -> int:
    """Bytes of the repo not yet on disk (a file counts as present when its size matches)."""
    return sum(size for name, size in sizes.items()
               if not (os.path.isfile(p := os.path.join(model_dir, name)) and os.path.getsize(p) == size))


def fallback_repo_bytes(repo_id: Optional[str]) -> float:
    """The size assumed for `repo_id` when its listing can't be had: its own for a repo the kit knows, else Air's."""
    return KNOWN_REPO_BYTES.get((repo_id or "").rstrip("/"), FALLBACK_REPO_BYTES)


def check_disk_space(model_dir: str, remote: Optional[RemoteRepo], min_free_gb: Optional[float],
                     repo_id: Optional[str] = None) -> None:
    """Refuse (HubError) when the disk under `model_dir` can't hold what is still to be downloaded."""
    free = free_bytes(model_dir)
    if min_free_gb is not None:
        need, why = min_free_gb * GB, f"--min-free-gb {min_free_gb:g}"
    else:
        if remote is not None:
            missing, source = bytes_still_needed(model_dir, remote.sizes), "still to download"
        else:
            missing = max(fallback_repo_bytes(repo_id) - footprint(model_dir)[0], 0)
            source = "estimated still to download"
        if missing == 0:
            return  # nothing left to fetch: never block a finished download
        margin = MARGIN_BYTES + MARGIN_FRACTION * missing
        need = missing + margin
        why = f"{human_size(missing)} {source} + {human_size(margin)} margin"
    if free < need:
        raise HubError(f"not enough free disk space for {model_dir}: need {human_size(need)} ({why}), "
                       f"have {human_size(free)}; free up space, point paths.model_dir at a bigger disk, "
                       "or override with --min-free-gb")
    print(f"disk space: {human_size(free)} free, {human_size(need)} needed ({why})", flush=True)


def human_size(n: float) -> str:
    """Decimal units, as the Hub shows them; MB below a gigabyte so small repos don't read "0.0 GB"."""
    return f"{n / GB:,.1f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem that `path` is (or will be) on."""
    path = os.path.abspath(path)
    while not os.path.exists(path):  # model_dir may not exist yet: ask its nearest existing parent
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


# ---------------------------------------------------------------------------
# Errors -> one line with what to do
# ---------------------------------------------------------------------------

def explain_hub_error(exc: BaseException, repo_id: str, revision: str, endpoint: Optional[str] = None,
                      timeout: Optional[float] = None) -> str:
    """Turn a huggingface_hub / network / disk error into one line saying what to do."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = (endpoint or constants.ENDPOINT).rstrip("/")
    resume = "rerun download_model.py to resume (finished files are kept)"
    timed_out = _timeout_in(exc)
    if timed_out is not None:
        message = (f"{_who_did_not_answer(timed_out, hub)} did not answer within {timeout or DEFAULT_TIMEOUT:g} s "
                   f"({type(timed_out).__name__}): check your network, proxy or HF_ENDPOINT (or raise --timeout), "
                   f"then {resume}")
    elif isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        message = _gated_message(repo_id, endpoint, have_token=_token() is not None)
    elif isinstance(exc, RepositoryNotFoundError):
        message = (f"repository {repo_id} not found on {hub} (or it is private): check model.name_or_path; "
                   "for a private repo run `hf auth login` or set HF_TOKEN")
    elif isinstance(exc, RevisionNotFoundError):
        message = (f"revision {revision!r} not found in {repo_id}: set model.revision to an existing "
                   "branch, tag or commit hash")
    elif isinstance(exc, HFValidationError):
        message = f"model.name_or_path {repo_id!r} is not a Hub repo id (owner/name): fix it in the config"
    elif isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code == 401:
        message = "the Hub rejected your token (HTTP 401): run `hf auth login` again or fix HF_TOKEN"
    elif isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "error"
        message = f"the Hub answered HTTP {status} ({_first_line(exc)}); wait a little, then {resume}"
    elif isinstance(exc, OfflineModeIsEnabled) or (
            isinstance(exc, LocalEntryNotFoundError) and isinstance(exc.__cause__, OfflineModeIsEnabled)):
        message = "HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it, or use --verify-only"
    elif isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.ProxyError, LocalEntryNotFoundError)):
        message = (f"cannot reach the Hub at {hub} ({_first_line(exc)}): check your network, proxy or "
                   f"HF_ENDPOINT, then {resume}")
    elif isinstance(exc, httpx2.TransportError):
        message = f"the download was cut off ({_first_line(exc)}): {resume}"
    elif isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        message = f"the disk filled up during the download ({_first_line(exc)}): free some space, then {resume}"
    else:
        message = f"download failed: {type(exc).__name__}: {_first_line(exc)}; {resume}"
    return _redact(message)


def _timeout_in(exc: BaseException):
    """The httpx timeout behind `exc` (itself, or a cause huggingface_hub wrapped it in), or None."""
    import httpx2

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, httpx2.TimeoutException):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _who_did_not_answer(exc: BaseException, hub: str) -> str:
    """"the Hub at <endpoint>", or the file server it redirected to, named by its origin."""
    try:
        url = exc.request.url
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when no request is attached
        return f"the Hub at {hub}"
    origin = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"
    return f"the Hub at {hub}" if origin == hub else f"{origin} (the Hub at {hub} sends downloads there)"


def _gated_message(repo_id: str, endpoint: Optional[str], have_token: bool) -> str:
    from huggingface_hub import constants

    page = f"{(endpoint or constants.ENDPOINT).rstrip('/')}/{repo_id}"
    if have_token:
        return (f"{repo_id} is gated and your Hugging Face token has no access to it: request access at {page} "
                "with the account the token belongs to, wait for approval, then rerun download_model.py")
    return (f"{repo_id} is gated and no Hugging Face token was found: request access at {page}, then run "
            "`hf auth login` (or set HF_TOKEN) and rerun download_model.py")


def _is_server_trouble(exc: BaseException) -> bool:
    """A Hub-side hiccup (5xx, 429) on the listing, as opposed to a problem the user must fix."""
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
    return response is not None and (response.status_code >= 500 or response.status_code == 429)


def _token() -> Optional[str]:
    from huggingface_hub import get_token

    return get_token()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _redact(text: str) -> str:
    """Belt and braces: error texts come from servers and libraries; never echo the token."""
    token = _token()
    return text.replace(token, "***") if token else text


# ---------------------------------------------------------------------------
# Footprint
# ---------------------------------------------------------------------------

def footprint(model_dir: str) -> tuple[int, int]:
    """(bytes of the checkpoint's files, bytes of abandoned partial downloads) under `model_dir`.

    A run killed hard (SIGKILL, power loss) leaves `*.incomplete` files that huggingface_hub 2.4 never
    reuses; they are reported separately so the user can reclaim the space.
    """
    files = partial = 0
    for root, _dirs, names in os.walk(model_dir):
        for name in names:
            try:
                size = os.path.getsize(os.path.join(root, name))
            except OSError:  # a download finishing (renaming its temp file) under our feet
                continue
            if name.endswith(".incomplete"):
                partial += size
            else:
                files += size
    return files, partial


def is_hub_download(model_dir: str) -> bool:
    """Whether `model_dir` was filled by snapshot_download (it leaves its metadata folder behind)."""
    return os.path.isdir(os.path.join(model_dir, HF_LOCAL_CACHE))
