"""Telling a local path from a Hugging Face Hub name, and one-line reasons for failed loads.

A `data.path`, `data.tokenizer` or `model.transformer.pretrained` that does not exist locally is
tried on the Hub; a mistyped local path must not be: the user would read a network error about a
"dataset" they never meant.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from sfl_ray.config_base import ConfigError

# Suffixes of files, never of hub repository names (which may hold dots, so not any suffix).
FILE_SUFFIXES = {".gz", ".tgz", ".tar", ".zip", ".parquet", ".csv", ".tsv", ".json", ".jsonl", ".arrow", ".txt",
                 ".npy", ".npz", ".idx", ".ubyte", ".png", ".jpg", ".jpeg", ".bin", ".pt", ".safetensors",
                 ".yaml", ".yml"}


def looks_local(path: str) -> bool:
    """Absolute, ./ ../ ~, a parent folder that exists here, or a file suffix: meant as a local path."""
    p = Path(path)
    if p.is_absolute() or path.startswith(("./", "../", "~", ".\\", "..\\")) or path in (".", ".."):
        return True
    parent = str(p.parent)
    return (parent not in ("", ".") and Path(parent).is_dir()) or p.suffix.lower() in FILE_SUFFIXES


def require_local(key: str, path: str | None) -> None:
    """ConfigError if `path` is meant as a local path and is not there."""
    if path is not None and not Path(path).exists() and looks_local(path):
        raise ConfigError(key, path, "no such file or folder")


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def reason(exc: BaseException, limit: int = 240) -> str:
    """An exception as one short line: type and first message line, and those of its root cause
    (libraries wrap the telling error, e.g. a UnicodeDecodeError, in a generic one)."""
    root = exc
    while (root.__cause__ or root.__context__) is not None and root is not (root.__cause__ or root.__context__):
        root = root.__cause__ or root.__context__
    text = _line(exc) if root is exc else f"{_line(exc)} ({_line(root)})"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A TCP connect to the Hub: answers in milliseconds offline (no DNS) and within this bound otherwise.
HUB_PROBE_TIMEOUT_S = 3.0


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub can be reached: False in offline mode (HF_HUB_OFFLINE); True
    behind a proxy (only the libraries can go through it); else whether it answers a TCP connect
    (probed once per process and endpoint)."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    return _answers(hub.ENDPOINT)


@functools.lru_cache(maxsize=4)
def _answers(endpoint: str) -> bool:
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_access() -> Iterator[None]:
    """Around a call that may reach the Hub: when the Hub cannot be reached, the call runs in
    offline mode (the local cache only), so a name that is not cached fails at once instead of
    after half a minute of retries and a screen of warnings."""
    if hub_reachable():
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True  # both libraries read these at call time
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before


def not_on_hub(key: str, name: str, exc: BaseException, what: str = "dataset") -> ConfigError:
    """The error for a name that is not a local path and could not be loaded from the Hub: what
    was asked, and how to get it."""
    if not hub_reachable():
        return ConfigError(key, name, f"not a local file or folder, and the Hugging Face Hub cannot be reached "
                           f"(offline) with no cached copy of this {what}: load it once where there is network "
                           f"(it is then cached), or give a local copy with --set {key}=PATH")
    return ConfigError(key, name, f"neither a local file or folder nor a Hugging Face Hub {what} (no such "
                       f"repository, or no access): {reason(exc)}")
