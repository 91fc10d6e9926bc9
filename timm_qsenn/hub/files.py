"""Where a saved model's files are: a local model folder (or a run folder's ``model/``), or a Hub repository."""

from __future__ import annotations

import os
from pathlib import Path

from .format import CONFIG_FILE

__all__ = ["model_folder", "split_revision", "hub_file"]


def model_folder(path: str | os.PathLike) -> Path:
    """The folder holding config.json: ``path`` itself, or ``path/model`` for a training run folder."""
    path = Path(path).expanduser()
    for folder in (path, path / "model"):
        if (folder / CONFIG_FILE).is_file():
            return folder
    if path.is_file():
        raise ValueError(
            f"{path} is a file; pass the folder holding config.json and model.safetensors (for a bare weights "
            "file use timm.create_model(..., checkpoint_path=...))"
        )
    if not path.exists():
        raise FileNotFoundError(f"no model folder at {path}; for a Hub repository pass 'hf-hub:ORG/NAME'")
    raise FileNotFoundError(
        f"{path} holds no {CONFIG_FILE} (nor model/{CONFIG_FILE}); pass a folder written by timm_qsenn.hub."
        "save_pretrained or a training run folder"
    )


def split_revision(repo: str) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of ``[hf-hub:]ORG/NAME[@REVISION]``; the revision is None when not given."""
    repo_id, _, revision = repo.removeprefix("hf-hub:").removeprefix("hf_hub:").partition("@")
    return repo_id, revision or None


def hub_file(repo: str, filename: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download (or find in the cache) one file of a Hub repository; a missing one is a FileNotFoundError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, revision = split_revision(repo)
    try:
        return Path(
            hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, library_name="timm_qsenn")
        )
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(
            f"hf-hub:{repo} has no {filename} that can be reached ({type(e).__name__}: {e}); check the repository "
            "id, your token for private repositories, or the local cache when HF_HUB_OFFLINE=1"
        ) from e
