"""A Hub revision's files (sizes, LFS sha256), the HF cache, and downloads: online from the Hub, or
offline from a cached tree listing, or from the snapshot folder alone (a cache filled file by file by
``hf_hub_download``, transformers or an older huggingface_hub). Cache paths come from
huggingface_hub's own helpers; every call is retried by ``hub.retry`` and every failure is one line
(``hub.errors``).

>>> listing = list_revision("org/name", "main")  # doctest: +SKIP
>>> listing.files["model.safetensors"].size  # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_model_stock.errors import SourceError
from hf_model_stock.hub.errors import hub_error_message, transport_errors
from hf_model_stock.hub.ranges import RemoteFile
from hf_model_stock.hub.retry import retrying

COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubFile:
    """One file of a revision: its path in the repo, size, and the Hub's hashes where known."""

    path: str
    size: int
    sha256: str | None = None  # the LFS oid
    blob_id: str | None = None  # the git blob id


@dataclass(frozen=True)
class RepoListing:
    """The files of ``repo_id`` at ``commit``; ``complete`` is False when offline, without a cached tree
    listing, the files are what the snapshot folder holds (hashes unknown)."""

    repo_id: str
    commit: str
    files: dict[str, HubFile]
    complete: bool = True

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def remote_file(self, name: str) -> RemoteFile:
        """``name`` as a file to read over HTTP, with the hash to check it against."""
        from huggingface_hub import hf_hub_url

        f = self.files[name]
        return RemoteFile(url=hf_hub_url(self.repo_id, name, revision=self.commit), size=f.size, repo_id=self.repo_id,
                          filename=name, revision=self.commit, sha256=f.sha256,
                          git_oid=None if f.sha256 else f.blob_id)

    def cached(self, name: str) -> Path | None:
        """``name``'s file in the HF cache, if it is there (linked in the snapshot, or its blob by hash)."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, name, revision=self.commit)
        if isinstance(found, str):
            return Path(found)
        f = self.files.get(name)
        etag = (f.sha256 or f.blob_id) if f else None
        blob = cache_dir(self.repo_id) / "blobs" / etag if etag else None
        return blob if blob is not None and blob.is_file() else None


def cache_dir(repo_id: str) -> Path:
    """The HF cache folder of a model repo (``models--org--name``)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit ``revision`` names in the HF cache (a commit sha is itself), or None."""
    rev = revision or "main"
    if COMMIT.fullmatch(rev):
        return rev
    ref = cache_dir(repo_id) / "refs" / rev
    return ref.read_text().strip() if ref.is_file() else None


def snapshot_files(repo_id: str, commit: str) -> list[HubFile] | None:
    """What the HF cache holds of ``repo_id`` at ``commit``: the snapshot folder's files (links to blobs
    whose blob is gone are left out); None when there is no such folder."""
    folder = cache_dir(repo_id) / "snapshots" / commit
    if not folder.is_dir():
        return None
    return [HubFile(p.relative_to(folder).as_posix(), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]


def _hub_file(f: Any) -> HubFile:
    lfs = getattr(f, "lfs", None)
    return HubFile(path=f.path, size=int(f.size or 0), sha256=getattr(lfs, "sha256", None) if lfs else None,
                   blob_id=getattr(f, "blob_id", None))


def _cached_tree(repo_id: str, commit: str) -> list[HubFile] | None:
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = get_cached_repo_tree(repo_id, revision=commit)
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None
    return [_hub_file(f) for f in tree if isinstance(f, RepoFile)]


def list_revision(repo_id: str, revision: str | None, label: str | None = None) -> RepoListing:
    """The files of ``repo_id`` at ``revision`` (default main) with sizes and hashes, from the Hub;
    offline, the cache's tree listing (sizes, no LFS hashes: huggingface_hub's cached listing drops
    them) or else its snapshot folder. ``SourceError`` in one line naming ``label`` otherwise."""
    label = label or (f"{repo_id}@{revision}" if revision else repo_id)
    if is_offline():
        commit = cached_commit(repo_id, revision)
        files = _cached_tree(repo_id, commit) if commit else None
        if files is not None and commit is not None:
            return RepoListing(repo_id, commit, {f.path: f for f in files})
        cached = snapshot_files(repo_id, commit) if commit else None
        if not cached or commit is None:
            raise SourceError(f"{label}: not in the local cache and the Hub is offline (HF_HUB_OFFLINE)")
        return RepoListing(repo_id, commit, {f.path: f for f in cached}, complete=False)
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    try:
        commit = revision if revision and COMMIT.fullmatch(revision) else retrying(
            lambda: api.repo_info(repo_id, revision=revision).sha)
        if commit is None:
            raise SourceError(f"{label}: the Hub did not say which commit {revision or 'main'!r} is")
        files = retrying(lambda: [_hub_file(f) for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                                  if isinstance(f, RepoFile)])
    except transport_errors() as exc:
        raise SourceError(hub_error_message(label, repo_id, revision, exc)) from None
    return RepoListing(repo_id, commit, {f.path: f for f in files})


def download(repo_id: str, filename: str, commit: str, label: str | None = None) -> Path:
    """One file of a revision, through the HF cache (``hf_hub_download``)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(retrying(lambda: hf_hub_download(repo_id, filename, revision=commit), head_retried=True))
    except transport_errors() as exc:
        raise SourceError(hub_error_message(label or repo_id, repo_id, commit, exc, download=True)) from None


def download_if_present(repo_id: str, filename: str, revision: str | None, label: str | None = None) -> Path | None:
    """One file of a revision through the HF cache, or None when the revision has no such file (offline:
    when the cache lacks it); any other failure is a one-line ``SourceError``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(retrying(lambda: hf_hub_download(repo_id, filename, revision=revision), head_retried=True))
    except LocalEntryNotFoundError as exc:
        if is_offline():
            return None
        raise SourceError(hub_error_message(label or repo_id, repo_id, revision, exc)) from None
    except EntryNotFoundError:
        return None
    except (*transport_errors(), ValueError) as exc:  # type: ignore[misc]  # ValueError: an invalid repo id
        raise SourceError(hub_error_message(label or repo_id, repo_id, revision, exc)) from None


def download_snapshot(repo_id: str, revision: str | None, patterns: list[str], label: str | None = None) -> Path:
    """The files of a revision matching ``patterns``, through the HF cache (``snapshot_download``); the
    folder is named by the commit."""
    from huggingface_hub import snapshot_download

    try:
        return Path(retrying(lambda: snapshot_download(repo_id, revision=revision, allow_patterns=patterns), head_retried=True))
    except transport_errors() as exc:
        raise SourceError(hub_error_message(label or repo_id, repo_id, revision, exc, download=True)) from None
