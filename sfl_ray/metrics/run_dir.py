"""The run directory's life: checked before anything is written, claimed atomically, and
removed again if the run made it and then stops on a config error.

`<output.dir>/<output.name>/` must be new or empty; `output.overwrite: true` empties an old one
first. Two runs started with one name cannot both write there: the claim is an exclusive create
of `config.yaml` in a folder made with `os.mkdir`, so exactly one of them gets it.

Hook for `--resume RUN_DIR` (to come): a resumed run is the one that reuses a non-empty run
directory; it should skip `check_run_dir` / `claim_run_dir` and open its RunWriter on the
existing folder (whose config.yaml it reads back).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfl_ray.config_base import ConfigError

_NOT_EMPTY = "add --set output.overwrite=true to replace it, or choose a new output.name"


@dataclass
class RunDir:
    """A claimed run directory and the folders this run created for it (outermost first)."""

    path: str
    made: list[Path] = field(default_factory=list)

    def release(self) -> None:
        """Undo the claim after a late config error: remove what this run created, and only that."""
        run = Path(self.path)
        if "://" in self.path:
            return  # remote stores: nothing was checked atomically either; leave it to the user
        if run not in self.made and run.is_dir():
            _clear(run)  # a folder that was there before: keep it, empty as we found (or overwrote) it
        _remove_made(self.made, run)


def _remove_made(made: list[Path], run: Path) -> None:
    """Remove the folders a run created (the run directory with its content), innermost first."""
    for d in reversed(made):
        if d == run:
            shutil.rmtree(d, ignore_errors=True)
        try:
            d.rmdir()  # a parent only if empty: something else may have been put there meanwhile
        except OSError:
            pass


def _clear(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _not_empty(cfg: Any, run: str) -> ConfigError:
    return ConfigError("output.name", cfg.run_name(), f"run directory {run} exists and is not empty; {_NOT_EMPTY}")


def check_run_dir(cfg: Any) -> None:
    """Everything about the run directory that can be known without writing; raises ConfigError."""
    run = cfg.run_dir()
    if "://" in run:
        import pyarrow.fs as pafs
        fs, root = pafs.FileSystem.from_uri(run)
        if fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)) and not cfg.output.overwrite:
            raise _not_empty(cfg, run)
        return
    out = Path(cfg.output.dir)
    existing = out
    while not existing.exists():  # the deepest part of output.dir that is there (at worst '.' or '/')
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError("output.dir", cfg.output.dir, f"{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("output.dir", cfg.output.dir, f"{existing} is not writable")
    path = Path(run)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ConfigError("output.name", cfg.run_name(), f"{run} exists and is not a folder")
        if any(path.iterdir()) and not cfg.output.overwrite:
            raise _not_empty(cfg, run)


def claim_run_dir(cfg: Any, config_text: str) -> RunDir:
    """Create (or empty, with output.overwrite) the run directory and write config.yaml into it,
    atomically: a second run with the same name gets a ConfigError. Folders made are 0700."""
    run = cfg.run_dir()
    if "://" in run:
        return _claim_remote(cfg, config_text)
    path = Path(run)
    made = _make_folders(cfg, path)
    try:  # the claim itself: exactly one process creates config.yaml
        fd = os.open(path / "config.yaml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # whoever created it owns the folder now, even if we made it: touch nothing
        raise ConfigError("output.name", cfg.run_name(), f"{run} was just claimed by another run; "
                          "choose a new output.name") from None
    except OSError as e:
        _remove_made(made, path)
        raise _cannot_create(cfg, run, e) from None
    with os.fdopen(fd, "wb") as f:
        f.write(config_text.encode())
    return RunDir(run, made)


def _make_folders(cfg: Any, path: Path) -> list[Path]:
    """output.dir (if missing) and the run directory, or an emptied/empty existing one; returns
    the folders made. On failure, removes only those: another folder may be another run's."""
    made: list[Path] = []
    try:
        for d in reversed([d for d in path.parents if not d.exists()]):  # outermost first
            try:
                os.mkdir(d, 0o700)
                made.append(d)
            except FileExistsError:  # made meanwhile by someone else: theirs, not ours
                pass
        if cfg.output.overwrite and path.is_dir() and not path.is_symlink():
            _clear(path)
        try:
            os.mkdir(path, 0o700)
            made.append(path)
        except FileExistsError:
            if not path.is_dir() or any(path.iterdir()):  # another run got there between check and claim
                raise _not_empty(cfg, str(path)) from None
    except ConfigError:
        _remove_made(made, path)
        raise
    except OSError as e:  # read-only file system, no permission (even for root), a file in the way
        _remove_made(made, path)
        raise _cannot_create(cfg, str(path), e) from None
    return made


def _cannot_create(cfg: Any, run: str, e: OSError) -> ConfigError:
    return ConfigError("output.dir", cfg.output.dir, f"cannot create the run directory {run}: {e.strerror or e}")


def _claim_remote(cfg: Any, config_text: str) -> RunDir:
    """Object stores have no atomic mkdir: check, empty if asked, write config.yaml (best effort)."""
    import pyarrow.fs as pafs

    from sfl_ray.metrics.writer import RunWriter

    fs, root = pafs.FileSystem.from_uri(cfg.run_dir())
    if fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if not cfg.output.overwrite:
            raise _not_empty(cfg, cfg.run_dir())
        fs.delete_dir_contents(root)
    RunWriter(cfg.run_dir()).write_text("config.yaml", config_text)
    return RunDir(cfg.run_dir())
