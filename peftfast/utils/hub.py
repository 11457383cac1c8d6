"""Finding adapter files in a local folder or on the Hugging Face Hub."""
from __future__ import annotations

import os
from typing import Any, Optional

_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve_file(model_id: str, filename: str, subfolder: Optional[str] = None, revision: Optional[str] = None,
                 **hub_kwargs: Any) -> str:
    """Path of ``filename`` in a local folder ``model_id`` (optionally ``subfolder``), or downloaded from the Hub.

    A local folder is used when it exists; otherwise ``model_id`` is taken as a Hub repo id and fetched with
    huggingface_hub at ``revision``. With ``HF_HUB_OFFLINE=1`` only the local Hub cache is consulted.
    Raises FileNotFoundError naming what was looked for and where.
    """
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"model_id must be a folder path or a Hub repo id, got {type(model_id).__name__}")
    if not os.fspath(model_id):
        raise FileNotFoundError("model_id is empty; pass a folder path or a Hub repo id")
    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        from .io import recover_folder

        recover_folder(local)  # finish or undo a save that was interrupted there before reading from it
        path = os.path.join(local, filename)
        if not os.path.isfile(path):
            present = sorted(os.listdir(local))
            raise FileNotFoundError(f"{filename} not found in {local} (it holds: {', '.join(present) or 'nothing'})")
        return path
    if os.path.exists(local):
        raise FileNotFoundError(f"{local} is a file; pass the folder that holds {filename}")
    if os.path.isabs(model_id) or model_id.startswith((".", "~")):
        raise FileNotFoundError(f"no folder {local} (looking for {filename})")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise FileNotFoundError(f"no local folder {local!r} and huggingface_hub is not installed") from None
    keep = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "token", "force_download", "local_files_only")}
    offline = hub_offline()
    if offline:
        keep["local_files_only"] = True
    try:
        return hf_hub_download(model_id, filename, subfolder=subfolder, revision=revision, **keep)
    except Exception as e:  # huggingface_hub raises many types (offline, 404, auth): report one clear error
        how = "HF_HUB_OFFLINE is set, so only the local Hub cache was searched" if offline else "the Hub lookup failed"
        raise FileNotFoundError(
            f"could not find {filename} for {model_id!r} (subfolder={subfolder!r}, revision={revision!r}): no such "
            f"local folder, and {how}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def file_exists(model_id: str, filename: str, subfolder: Optional[str] = None, revision: Optional[str] = None,
                **hub_kwargs: Any) -> bool:
    try:
        resolve_file(model_id, filename, subfolder=subfolder, revision=revision, **hub_kwargs)
    except FileNotFoundError:
        return False
    return True


def model_card_text(existing: Optional[str], base_model: Optional[str], tags: list[str],
                    pipeline_tag: Optional[str], version_line: str) -> Optional[str]:
    """README.md for an adapter folder, as PEFT writes it: huggingface_hub's model card with ``library_name: peft``,
    the base model, tags, and a framework-versions line. An existing card keeps its text and metadata (ours are
    added); a card whose metadata cannot be parsed is left alone (None is returned)."""
    from huggingface_hub import ModelCard, ModelCardData

    if existing is not None:
        try:
            card = ModelCard(existing, ignore_metadata_errors=True)
        except Exception:  # metadata that is not YAML: do not rewrite (and so lose) what the user wrote
            return None
    else:
        try:
            card = ModelCard.from_template(ModelCardData())
        except Exception:  # the template needs jinja2; a minimal card carries the same metadata
            card = ModelCard("---\n---\n\n# Model Card\n")
    card.data["library_name"] = "peft"
    old_tags = card.data.get("tags") or []
    card.data["tags"] = sorted(set(old_tags if isinstance(old_tags, list) else [old_tags]) | set(tags))
    if pipeline_tag and not card.data.get("pipeline_tag"):
        card.data["pipeline_tag"] = pipeline_tag
    if base_model:
        card.data["base_model"] = base_model
    lines = card.text.splitlines()
    heading = "### Framework versions"
    if version_line not in lines:
        if heading in lines:
            lines.insert(lines.index(heading) + 2, version_line)
        else:
            lines.append(f"{heading}\n\n{version_line}")
    card.text = "\n".join(lines)
    return str(card)
