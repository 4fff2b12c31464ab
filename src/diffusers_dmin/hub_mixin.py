"""[`IndexHubMixin`]: `save_pretrained`, `from_pretrained` and `push_to_hub` of an index, in the style of
huggingface_hub's `ModelHubMixin` and diffusers' `PushToHubMixin`.

The mixin owns the public persistence API and its documentation: where an index is (a local folder or a Hub repo,
[`~hub.HubLocation`]), the folder's write lock ([`~folderlock.folder_lock`]), and the upload as one commit. It knows
nothing of an index's state; the class provides two hooks:

- `cls._from_folder(folder, *, origin=None, manifest=None, load_hnsw=False)`: the index stored in `folder` (a local
  folder, or a Hub snapshot pulled from `origin`, whose skipped files are downloaded on use).
- `self._written(folder, *, link, repo_id=None, max_shard_rows=None)`: write the index into `folder` (crash-safe,
  manifest last). A save (`link=False`) is adopted: the folder's files back the index from then on. A push writes
  links into a temporary folder, which the index does not adopt.

[`GradientIndex`] implements both with [`~folder.read_index_folder`] and [`~folder.write_index_folder`].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from .constants import DEFAULT_COMMIT_MESSAGE, DEFAULT_REPO_TYPE
from .folderlock import folder_lock
from .hub import HubLocation


__all__ = ["IndexHubMixin"]

T = TypeVar("T", bound="IndexHubMixin")


class IndexHubMixin:
    """Save, load and push an index (local folders and Hub repositories); see the module doc for the two hooks."""

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_rows: int | None = None) -> None:
        r"""
        Save the index to a folder (DESIGN §4) with [`~folder.write_index_folder`]: shards, noise, HNSW graph and
        FAISS index (when built or loaded), dataset card, and the manifest last, every file atomically. Saving again
        to the same folder only adds shards for rows added since (old shards stay byte-identical).

        Args:
            save_directory (`str` or `os.PathLike`): The folder (created if needed).
            max_shard_rows (`int`, *optional*): Rows per new shard; defaults to about 1 GiB of sketches per shard
                ([`~storage.default_shard_rows`]).

        Raises:
            [`~folderlock.IndexLockedError`]: Another process is building or saving into `save_directory`.
        """
        with folder_lock(save_directory, "save"):  # refused while a build (or another save) writes there
            self._written(Path(save_directory), link=False, max_shard_rows=max_shard_rows)

    @classmethod
    def from_pretrained(
        cls: type[T],
        repo_id_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        endpoint: str | None = None,
        repo_type: str = DEFAULT_REPO_TYPE,
        force_download: bool = False,
        load_hnsw: bool = False,
    ) -> T:
        r"""
        Load an index from a local folder or a Hub repository (a dataset repo by default; [`~hub.HubLocation.locate`],
        [`~folder.read_index_folder`]). Shards are verified (size, sha256) before they are memory-mapped; a Hub pull
        skips the HNSW graph until the first approximate search (or `load_hnsw=True`) and uses the Hub cache.

        Args:
            repo_id_or_path (`str` or `os.PathLike`): A folder written by [`save_pretrained`], or a repo id.
            revision (`str`, *optional*): Branch, tag or commit of the repo.
            token (`str` or `bool`, *optional*): Hub token (defaults to the saved login / `HF_TOKEN`).
            cache_dir (`str`, *optional*): Hub cache folder.
            local_files_only (`bool`, *optional*, defaults to `False`): Only use the cache (offline).
            endpoint (`str`, *optional*): Hub endpoint.
            repo_type (`str`, *optional*, defaults to `"dataset"`): `"dataset"` or `"model"`.
            force_download (`bool`, *optional*, defaults to `False`): Download again (repairs a damaged cache).
            load_hnsw (`bool`, *optional*, defaults to `False`): Fetch and load the HNSW graph now.

        Raises:
            [`IndexNotFoundError`]: No index at the path or repo. [`IndexCorruptError`]: A file fails its checks.
            [`HubAuthenticationError`]: The Hub refused the token.
        """
        location = HubLocation(
            os.fspath(repo_id_or_path), repo_type, revision, token, cache_dir, endpoint, local_files_only
        )
        folder, origin = location.locate(force_download=force_download, include_hnsw=load_hnsw)
        return cls._from_folder(folder, origin=origin, load_hnsw=load_hnsw)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = DEFAULT_COMMIT_MESSAGE,
        revision: str | None = None,
        endpoint: str | None = None,
        repo_type: str = DEFAULT_REPO_TYPE,
        create_pr: bool = False,
        max_shard_rows: int | None = None,
    ) -> Any:
        r"""
        Upload the index to a Hub repository (a dataset repo by default, created if needed) in one commit, with a
        generated dataset card ([`~hub.HubLocation.upload`]).

        Args:
            repo_id (`str`): The repo, e.g. `"org/my-lora-dmin-index"` (or just a name, in your namespace).
            private (`bool`, *optional*): Visibility of a newly created repo.
            token (`str`, *optional*): Hub token with write access.
            commit_message (`str`, *optional*, defaults to `"Upload DMin gradient index"`): The commit message.
            revision (`str`, *optional*): Branch to push to (must exist).
            endpoint (`str`, *optional*): Hub endpoint.
            repo_type (`str`, *optional*, defaults to `"dataset"`): `"dataset"` or `"model"`.
            create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing.
            max_shard_rows (`int`, *optional*): Rows per shard for rows not saved yet.

        Returns:
            `huggingface_hub.CommitInfo`: The commit (a `str` with its URL).
        """
        location = HubLocation(repo_id, repo_type, revision, token, endpoint=endpoint)
        return location.upload(
            lambda folder: self._written(folder, link=True, repo_id=repo_id, max_shard_rows=max_shard_rows),
            private=private,
            commit_message=commit_message,
            create_pr=create_pr,
        )

    # ------------------------------------------------------------------------------------------------ hooks

    @classmethod
    def _from_folder(
        cls: type[T],
        folder: Path,
        *,
        origin: HubLocation | None = None,
        manifest: Any = None,
        load_hnsw: bool = False,
    ) -> T:
        """The index stored in `folder`, read by `manifest` (a [`~storage.Manifest`] not written yet; by default the
        folder's); `origin` is the Hub location of a pulled snapshot; `load_hnsw` loads the graph now."""
        raise NotImplementedError(f"{cls.__name__} must implement `_from_folder` to be loaded.")

    def _written(
        self, folder: Path, *, link: bool, repo_id: str | None = None, max_shard_rows: int | None = None
    ) -> Any:
        """Write the index into `folder`; adopt the folder's files when `link` is False (a save)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `_written` to be saved or pushed.")
