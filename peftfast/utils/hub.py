"""Finding adapter files in a local folder or on the Hugging Face Hub."""
from __future__ import annotations

import os
from typing import Any, Optional


def resolve_file(model_id: str, filename: str, subfolder: Optional[str] = None, revision: Optional[str] = None,
                 **hub_kwargs: Any) -> str:
    """Path of ``filename`` in a local folder ``model_id`` (optionally ``subfolder``), or downloaded from the Hub.

    A local folder is used when it exists; otherwise ``model_id`` is taken as a Hub repo id and fetched with
    huggingface_hub, which honours ``HF_HUB_OFFLINE``. Raises FileNotFoundError naming what was looked for.
    """
    if not isinstance(model_id, (str, os.PathLike)) or not str(model_id):
        raise ValueError(f"model_id must be a folder path or a Hub repo id, got {model_id!r}")
    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        path = os.path.join(local, filename)
        if not os.path.isfile(path):
            present = sorted(os.listdir(local))
            raise FileNotFoundError(f"{filename} not found in {local} (it holds: {', '.join(present) or 'nothing'})")
        return path
    if os.path.exists(local) or os.path.isabs(model_id) or model_id.startswith((".", "~")):
        raise FileNotFoundError(f"{local} is not a folder holding an adapter ({filename})")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise FileNotFoundError(f"no local folder {local!r} and huggingface_hub is not installed") from None
    keep = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "token", "force_download", "local_files_only")}
    try:
        return hf_hub_download(model_id, filename, subfolder=subfolder, revision=revision, **keep)
    except Exception as e:  # huggingface_hub raises many types (offline, 404, auth): report one clear error
        raise FileNotFoundError(
            f"could not find {filename} for {model_id!r} (revision={revision!r}): no such local folder, "
            f"and the Hub lookup failed: {type(e).__name__}: {e}"
        ) from None


def file_exists(model_id: str, filename: str, subfolder: Optional[str] = None, revision: Optional[str] = None,
                **hub_kwargs: Any) -> bool:
    try:
        resolve_file(model_id, filename, subfolder=subfolder, revision=revision, **hub_kwargs)
    except FileNotFoundError:
        return False
    return True
