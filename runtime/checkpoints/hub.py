"""Checkpoints in the local Hugging Face hub cache: ``hf://<owner>/<repo>[@<revision>]/<path>``.

Resolved offline (``local_files_only``): what ``huggingface-cli download <owner>/<repo>`` put in the cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``). A file resolves to its
snapshot file; a folder (the tokenizer, the ImageReward folder) to its folder in the snapshot. Nothing is
downloaded: a missing file raises ``CheckpointError`` with the download command.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError, ProfileError


def parse_hf(uri: str) -> tuple[str, str | None, str]:
    """``hf://owner/repo[@rev]/path`` -> (repo_id, revision or None, path inside the repo)."""
    parts = uri[len("hf://"):].split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"expected hf://<owner>/<repo>[@<revision>]/<path>, got {uri!r}")
    owner, repo, rest = parts
    rev = None
    if "@" in repo:
        repo, rev = repo.split("@", 1)
    return f"{owner}/{repo}", rev, rest.strip("/")


def hub_cache_dir() -> Path:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(os.path.expanduser(env))
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expanduser(home)) / "hub"
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def resolve_hf(uri: str, *, path=None, field=None) -> Path:
    """The local file or folder an ``hf://`` checkpoint names (offline); ``CheckpointError`` if not cached."""
    try:
        repo_id, rev, inner = parse_hf(uri)
    except ValueError as e:
        raise ProfileError(str(e), path=path, field=field) from None
    try:
        from huggingface_hub import snapshot_download, try_to_load_from_cache
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{uri} needs the huggingface_hub package (pip install huggingface_hub)",
                              path=uri) from None
    cache = hub_cache_dir()
    cached = try_to_load_from_cache(repo_id, inner, cache_dir=cache, revision=rev)
    if isinstance(cached, str):
        return Path(cached)
    try:  # not a cached file: a folder of the snapshot?
        snap = Path(snapshot_download(repo_id, revision=rev, cache_dir=cache, local_files_only=True,
                                       allow_patterns=[f"{inner}/*"]))
    except (LocalEntryNotFoundError, OSError, ValueError):
        snap = None
    if snap is not None and (snap / inner).is_dir() and any((snap / inner).iterdir()):
        return snap / inner
    rev_arg = f" --revision {rev}" if rev else ""
    raise CheckpointError(
        f"{uri} is not in the local Hugging Face cache ({cache}); nothing is downloaded at run time. "
        f"Fetch it first: huggingface-cli download {repo_id} {inner}{rev_arg}"
        + (f" (profile {path}, field {field})" if path is not None else ""), path=uri)
