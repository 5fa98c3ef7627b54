"""Telling a local path from a Hugging Face Hub name, and one-line reasons for failed loads.

A `data.path`, `data.tokenizer` or `model.transformer.pretrained` that does not exist locally is
tried on the Hub; a mistyped local path must not be: the user would read a network error about a
"dataset" they never meant.
"""

from __future__ import annotations

from pathlib import Path

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


def not_on_hub(key: str, name: str, exc: BaseException, what: str = "dataset") -> ConfigError:
    """The error for a name that is not a local path and could not be loaded from the Hub."""
    return ConfigError(key, name, f"neither a local file or folder nor a reachable Hugging Face Hub {what} "
                       f"(offline, or no such repository): {reason(exc)}")
