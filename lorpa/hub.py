"""Adapters on the Hugging Face Hub: a repo id wherever a command takes an adapter folder, and the upload of a
pruned one.

Only the adapter's own files are fetched (`snapshot_download` with allow-patterns), through the local cache, so
`HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` work as for any Hugging Face tool; a local folder always wins over a repo
id spelled the same. Every failure (no such repo, a gated one, no network, no LoRA adapter in it) is one line
naming the id and what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter came from: the folder read, and the repo id and commit when it came from the Hub."""

    folder: Path
    repo_id: str | None = None
    revision: str | None = None  # the commit the files were read at
    subfolder: str | None = None

    def describe(self) -> str:
        if self.repo_id is None:
            return str(self.folder)
        where = f"{self.repo_id}" + (f"/{self.subfolder}" if self.subfolder else "")
        return f"{where} @ {self.revision[:12]}" if self.revision else where

    @property
    def url(self) -> str | None:
        if self.repo_id is None:
            return None
        tree = f"/tree/{self.revision}/{self.subfolder}" if self.subfolder and self.revision else ""
        return f"https://huggingface.co/{self.repo_id}{tree}"


def could_be_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text)) and not text.endswith((".", "-")) and ".." not in text


def resolve_adapter(source: str, revision: str | None = None, subfolder: str | None = None) -> AdapterSource:
    """The folder holding the adapter `source` names: a local folder (always, when it exists), else a Hub repo id
    whose adapter files are fetched into the cache (or read from it offline)."""
    local = Path(source)
    if local.exists():
        if revision is not None:
            raise InputError(f"--revision {revision}: {source} is a local folder, which has no revisions")
        return AdapterSource(local / subfolder if subfolder else local, subfolder=subfolder)
    if not could_be_repo_id(source):
        raise InputError(f"adapter folder {source} not found (and it cannot be a Hub repo id, which is NAME or "
                         "OWNER/NAME)")
    folder = download(source, revision, subfolder)
    if not (folder / ADAPTER_FILES[0]).is_file():
        where = f" in its subfolder {subfolder}" if subfolder else ""
        raise InputError(f"{source} holds no LoRA adapter{where} (no {ADAPTER_FILES[0]}); give the repo of a peft "
                         "adapter, or --subfolder where it keeps one")
    snapshot = folder.parent if subfolder else folder
    return AdapterSource(folder, source, snapshot.name, subfolder)


def download(repo_id: str, revision: str | None, subfolder: str | None) -> Path:
    """The adapter's files of `repo_id` at `revision`, from the cache or the Hub: the snapshot folder (its
    subfolder when one is given)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    at = f" at revision {revision}" if revision else ""
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=[prefix + f for f in ADAPTER_FILES])
    except GatedRepoError:
        raise InputError(f"{repo_id} is a gated repo: accept its terms on the Hub and log in (hf auth login), or "
                         "set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"{repo_id}: no such repo on the Hub (or it is private: log in with hf auth login)") from None
    except RevisionNotFoundError:
        raise InputError(f"{repo_id} has no revision {revision}") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{repo_id}{at} is not in the local cache and the Hub cannot be reached (offline, or "
                         "HF_HUB_OFFLINE=1): download it once online, or give a local folder") from None
    except (HfHubHTTPError, OSError) as error:
        raise InputError(f"{repo_id}: the Hub did not answer ({str(error).strip().splitlines()[0]})") from None
    return Path(snapshot) / prefix if prefix else Path(snapshot)


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                message: str = "Upload pruned LoRA adapter", ignore: list[str] | None = None) -> str:
    """Upload `folder` (but the files matching `ignore`) to the Hub repo `repo_id` (created if missing; `revision` a
    branch, created if missing); returns the commit's URL. Any failure is one line; the folder is left as it is."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                   commit_message=message, ignore_patterns=ignore)
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise InputError(f"uploading {folder} to {repo_id} failed ({str(error).strip().splitlines()[0]}); the "
                         "output is complete on disk: push it again later (--push_to_hub) or with hf upload") from None
    return str(getattr(commit, "commit_url", commit))
