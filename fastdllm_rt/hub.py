"""Turn a ``model`` argument (local folder or hub id) into a local checkpoint folder.

Hub ids go through ``huggingface_hub.snapshot_download``, which honours ``HF_TOKEN``, ``HF_HOME`` and
``HF_HUB_OFFLINE`` itself; we only translate its failures into messages that say what to do.
"""
from __future__ import annotations

import difflib
import os
import re

from .errors import HubError

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_checkpoint(model: str | os.PathLike, *, revision: str | None = None) -> str:
    """Return a local folder holding ``config.json`` and the safetensors weights of ``model``."""
    path = os.path.expanduser(os.fspath(model))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise HubError(f"{path} is a file; `model` must be a checkpoint folder (config.json + *.safetensors) "
                       f"or a hub id such as Efficient-Large-Model/Fast_dLLM_v2_7B")
    if looks_local(os.fspath(model)) or not _HUB_ID.match(path):
        raise HubError(missing_folder_message(path))
    return _download(path, revision)


def looks_local(name: str) -> bool:
    """A name meant as a folder here: it starts with ``.``, ``/`` or ``~``, its first component exists in the
    working directory, or its parent folder exists. A hub id ``owner/name`` has none of these (unless a folder
    named ``owner`` is here, and then the user most likely means that folder)."""
    if name.startswith((".", "/", "~")) or os.path.isabs(name):
        return True
    first = name.replace(os.sep, "/").split("/", 1)[0]
    parent = os.path.dirname(os.path.expanduser(name))
    return os.path.exists(first) or (os.sep in name and bool(parent) and os.path.isdir(parent))


def missing_folder_message(path: str) -> str:
    """The folder ``path`` does not exist: say so, with the closest existing name beside where it went wrong."""
    parts = os.path.normpath(path).split(os.sep)
    base = os.sep if path.startswith(os.sep) else ""
    for depth in range(len(parts), 0, -1):
        parent = os.path.join(base, *parts[:depth - 1]) if depth > 1 else (base or ".")
        if os.path.isdir(parent):
            wrong = parts[depth - 1]
            close = difflib.get_close_matches(wrong, sorted(os.listdir(parent)), n=1, cutoff=0.6)
            hint = f"; did you mean {os.path.join(parent, close[0]) if depth > 1 else close[0]}?" if close else ""
            return (f"no folder {path} ({os.path.abspath(parent)} has no {wrong!r}){hint or ';'} `model` is a "
                    f"local checkpoint folder or a hub id such as Efficient-Large-Model/Fast_dLLM_v2_7B")
    return f"no folder {path}. `model` is a local checkpoint folder or a hub id such as owner/name"


def _download(repo_id: str, revision: str | None) -> str:
    try:
        import huggingface_hub
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import errors as hub_errors
    except ImportError as e:  # pragma: no cover - huggingface_hub is an install requirement
        raise HubError("huggingface_hub is not installed; `pip install huggingface_hub` or pass a local folder") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS)
    except hub_errors.GatedRepoError:
        raise HubError(f"{repo_id} is a gated repository and this token has no access (or no token is set). "
                       f"Request access at https://huggingface.co/{repo_id}, then set HF_TOKEN or run "
                       f"`huggingface-cli login`") from None
    except hub_errors.RepositoryNotFoundError:
        raise HubError(f"hub repository {repo_id} was not found (or is private and no token is set); "
                       f"check the id, or set HF_TOKEN for a private repository") from None
    except hub_errors.RevisionNotFoundError:
        raise HubError(f"revision {revision!r} of {repo_id} does not exist; pass an existing branch, tag "
                       f"or commit") from None
    except hub_errors.LocalEntryNotFoundError:
        if offline:
            raise HubError(f"HF_HUB_OFFLINE=1 and {repo_id} is not in the local cache "
                           f"({hub_constants.HF_HUB_CACHE}); download it once with network access "
                           f"(`huggingface-cli download {repo_id}`), point HF_HOME at a cache that has it, or "
                           f"pass a local folder") from None
        raise HubError(f"could not reach the hub to download {repo_id} and it is not cached locally; check "
                       f"the network, or pass a local folder") from None
