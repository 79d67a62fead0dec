"""Publish an exported model folder to the Hugging Face Hub with the stock client.

A publish is one atomic commit: every file of the folder lands in the same
commit or none does, so a reader never sees a half-uploaded checkpoint. It is
idempotent: when the remote revision already holds every file with the same
content, nothing is committed and the existing commit is returned.

The token is never logged, printed or put in an error message.

Environment notes (huggingface_hub 2.4.0 reads these once, at import time):
- HF_HUB_OFFLINE=1 blocks every request; publishing then stops with an InputError.
- with hf_xet installed, uploads go through Xet unless HF_HUB_DISABLE_XET=1.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Mapping

from quantize_pipeline.errors import InputError, StageError
from quantize_pipeline.run.rundir import hash_tree

log = logging.getLogger(__name__)

HUB_SCHEME = "hf://"
# Hub repo names: letters, digits, '-', '_', '.'; no '--' or '..' and no leading/trailing '-' or '.'.
_REPO_PART = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"
# Files the Hub creates itself; they are not part of what we publish.
HUB_MANAGED_FILES = frozenset({".gitattributes"})
STAGE = "publish"


def parse_hub_target(target: str) -> str | None:
    """`hf://ORG/NAME` -> "ORG/NAME"; any other target is a local folder (None).

    A target that starts with hf:// but is not ORG/NAME is an input error rather
    than a folder literally named "hf:".
    """
    if not target.startswith(HUB_SCHEME):
        return None
    parts = target[len(HUB_SCHEME) :].strip("/").split("/")
    if len(parts) != 2 or not all(_REPO_PART.match(part) for part in parts):
        raise InputError(f"publish target {target!r} is not hf://ORG/NAME", stage=STAGE)
    return "/".join(parts)


def resolve_token(env: Mapping[str, str] = os.environ) -> str | None:
    """HF_TOKEN from `env`, else the token saved by `hf auth login` (huggingface_hub.get_token)."""
    token = (env.get("HF_TOKEN") or "").strip()
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def _endpoint_name(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _require_online() -> None:
    from huggingface_hub import constants

    # The client refuses every request in offline mode; say so before it fails deep inside an upload.
    if constants.is_offline_mode():
        raise InputError("HF_HUB_OFFLINE is set: unset it (HF_HUB_OFFLINE=0) to publish to the Hub", stage=STAGE)


def _http_failure(err: Exception, action: str, endpoint: str) -> InputError | StageError:
    """One line for a failed Hub call: no URL query, no headers, so never the token."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        detail = err.server_message or err.response.reason_phrase
        if status in (401, 403):
            return InputError(f"{action}: {endpoint} refused ({status}: {detail}); {LOGIN_HINT} with a write token", stage=STAGE)
        return StageError(f"{action}: {endpoint} answered {status}: {detail}", stage=STAGE)
    return StageError(f"{action}: cannot reach {endpoint} ({type(err).__name__})", stage=STAGE)


def check_token(token: str | None, endpoint: str | None = None) -> str:
    """Ask the Hub who owns `token` (whoami) before any upload; return the user name.

    Raises InputError (exit code 2) for a missing, rejected or read-only token.
    """
    import httpx2  # huggingface_hub 2.x's HTTP client; its transport errors are not OSErrors
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    name = _endpoint_name(endpoint)
    if not token:
        raise InputError(f"no HF token to publish to {name}: {LOGIN_HINT}", stage=STAGE)
    _require_online()
    try:
        identity = HfApi(endpoint=name).whoami(token=token)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise InputError(f"HF token rejected by {name} (401): {LOGIN_HINT}", stage=STAGE) from None
        raise _http_failure(err, "checking the HF token", name) from None
    except (OSError, httpx2.TransportError) as err:
        raise _http_failure(err, "checking the HF token", name) from None
    role = identity.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise InputError(f"HF token for {identity.get('name')} is read-only on {name}: use a write token", stage=STAGE)
    return identity.get("name", "")


def dry_run_listing(folder: Path) -> list[dict]:
    """What a publish would upload: path, size and sha256 of every file (hidden entries skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder to publish", stage=STAGE)
    return [
        {"path": path, "size": (folder / path).stat().st_size, "sha256": digest}
        for path, digest in hash_tree(folder).items()
    ]


def _git_blob_id(path: Path) -> str:
    """The git oid of a file's content: what the Hub reports for a regular (non-LFS) file."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _same_content(local_file: Path, item: dict, remote) -> bool:
    """Does the remote RepoFile hold exactly the local file? LFS: sha256; regular: git blob id."""
    if remote is None or remote.size != item["size"]:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == item["sha256"]
    return remote.blob_id == _git_blob_id(local_file)


def _remote_files(api, repo_id: str, commit: str) -> dict:
    """path -> RepoFile at one commit (not a branch, so the listing matches the commit we compare with)."""
    from huggingface_hub.hf_api import RepoFile

    return {
        entry.path: entry
        for entry in api.list_repo_tree(repo_id, recursive=True, revision=commit)
        if isinstance(entry, RepoFile)
    }


def _repo_url(endpoint: str, repo_id: str, revision: str) -> str:
    return f"{endpoint}/{repo_id}" if revision == "main" else f"{endpoint}/{repo_id}/tree/{revision}"


def publish_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str,
    endpoint: str | None = None,
    private: bool = True,
    revision: str | None = None,
    commit_message: str,
) -> dict:
    """Upload `folder` to `repo_id` in ONE commit, unless the remote already holds it.

    Returns {"repo_id", "revision", "commit", "url", "already_published", "private"}.
    `private` applies when the repo is created; an existing repo keeps its visibility
    (the Hub ignores the flag then), which is reported in the result and logged.
    """
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    name = _endpoint_name(endpoint)
    listing = dry_run_listing(folder)
    if not listing:
        raise InputError(f"{folder}: nothing to publish (empty folder)", stage=STAGE)
    check_token(token, name)
    branch = revision or "main"
    api = HfApi(endpoint=name, token=token, library_name="quantize-pipeline")
    step = "creating the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            step = f"creating branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "reading the remote revision"
        info = api.repo_info(repo_id, revision=branch)
        remote = _remote_files(api, repo_id, info.sha)
        changed = [item for item in listing if not _same_content(folder / item["path"], item, remote.get(item["path"]))]
        result = {
            "repo_id": repo_id,
            "revision": branch,
            "url": _repo_url(name, repo_id, branch),
            "private": bool(info.private),
        }
        if bool(info.private) != private:
            log.warning("%s already exists and is %s; its visibility was left as is", repo_id, "private" if info.private else "public")
        extra = sorted(set(remote) - {item["path"] for item in listing} - HUB_MANAGED_FILES)
        if extra:
            log.warning("%s@%s also holds files not in the published folder: %s", repo_id, branch, ", ".join(extra))
        if not changed:
            return {**result, "commit": info.sha, "already_published": True}
        # create_commit, not upload_folder: with hf_xet installed upload_folder streams a large folder
        # into several commits; create_commit always makes exactly one. parent_commit makes the Hub
        # refuse the commit if the branch moved since we compared, instead of silently mixing trees.
        step = "uploading"
        commit = api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path_in_repo=item["path"], path_or_fileobj=folder / item["path"]) for item in changed],
            commit_message=commit_message,
            revision=branch,
            parent_commit=info.sha,
        )
    except (HfHubHTTPError, OSError, httpx2.TransportError) as err:
        raise _http_failure(err, f"publishing {repo_id} ({step})", name) from None
    log.info("published %d changed file(s) to %s@%s: %s", len(changed), repo_id, branch, commit.oid)
    return {**result, "commit": commit.oid, "already_published": False}
