"""Model names: aliases, local directories, the Hugging Face cache, and downloads when online."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# alias -> Hugging Face repo id
ALIASES: dict[str, str] = {
    "phi-1": "microsoft/phi-1",
    "phi-1_5": "microsoft/phi-1_5",
    "phi-1.5": "microsoft/phi-1_5",
    "phi-2": "microsoft/phi-2",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-mini-4k": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-mini-128k": "microsoft/Phi-3-mini-128k-instruct",
    "phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct",
    "phi-3-medium": "microsoft/Phi-3-medium-4k-instruct",
    "phi-3-medium-128k": "microsoft/Phi-3-medium-128k-instruct",
    "phi-4-mini": "microsoft/Phi-4-mini-instruct",
    "phi-4": "microsoft/phi-4",
    "phi-4-reasoning": "microsoft/Phi-4-reasoning",
    "phi-4-reasoning-plus": "microsoft/Phi-4-reasoning-plus",
    "phi-4-mini-reasoning": "microsoft/Phi-4-mini-reasoning",
}
# What an export needs from a repository (no pickles, no ONNX/GGUF side folders).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


class ModelNotFoundError(FileNotFoundError):
    """The name is neither a checkpoint directory, a cached model, nor downloadable now."""


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "EDGEPHI_OFFLINE"))


def repo_id_for(name: str) -> str | None:
    """The repo id for an alias or an owner/name string; None for anything else."""
    if name.lower() in ALIASES:
        return ALIASES[name.lower()]
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")):
        return name
    return None


def resolve(name: str | os.PathLike, offline: bool | None = None, cache_dir: str | None = None,
            revision: str | None = None) -> Path:
    """A local directory holding config.json for `name` (an alias, a directory or a repo id).

    Order: an existing directory; the Hugging Face cache; a download (unless offline).
    """
    if str(name) == "default":
        from edgephi.default_model import checkpoint_dir

        return checkpoint_dir()
    path = Path(os.path.expanduser(str(name)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path}: not a Hugging Face checkpoint (no config.json)")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path}: is a file; give the checkpoint's directory")
    repo = repo_id_for(str(name))
    if repo is None:
        raise ModelNotFoundError(
            f"{name!r}: no such directory, and not a model alias or a Hugging Face repo id (owner/name). "
            f"Aliases: {', '.join(sorted(ALIASES))}")
    offline = _offline() if offline is None else offline
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a core dependency
        raise ModelNotFoundError(f"{name!r}: huggingface_hub is not installed; pass a local directory") from None
    try:
        local = snapshot_download(repo, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=True,
                                  cache_dir=cache_dir, revision=revision)
        log.info("using %s from the Hugging Face cache: %s", repo, local)
        return Path(local)
    except Exception:  # noqa: BLE001 - huggingface_hub raises several types for "not cached"
        pass
    hint = (f"download it where you are online (huggingface-cli download {repo}) and pass the directory: "
            f"edgephi export /path/to/{repo.split('/')[-1]}")
    if offline:
        raise ModelNotFoundError(f"{name!r} ({repo}) is not in the Hugging Face cache and downloads are off "
                                 f"(HF_HUB_OFFLINE): {hint}") from None
    try:
        log.info("downloading %s", repo)
        return Path(snapshot_download(repo, allow_patterns=DOWNLOAD_PATTERNS, cache_dir=cache_dir,
                                      revision=revision))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise ModelNotFoundError(f"{name!r} ({repo}) could not be downloaded ({reason[:200]}); {hint}") from None
