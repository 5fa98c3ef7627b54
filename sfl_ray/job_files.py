"""The job files shipped inside the package (`sfl_ray/jobs/*.yaml`), found by name.

The repository's top-level `jobs/` is a symlink to that folder, so `--config jobs/quickstart.yaml`
works from a checkout, and `--config quickstart` works wherever the package is installed.
"""

from __future__ import annotations

from pathlib import Path

from sfl_ray.config_base import ConfigError

JOBS_DIR = Path(__file__).resolve().parent / "jobs"


def shipped_jobs() -> list[str]:
    """Names of the shipped jobs (file stems), sorted."""
    return sorted(p.stem for p in JOBS_DIR.glob("*.yaml"))


def resolve_config_path(path: str) -> Path:
    """The job file `path` names: the file itself if it exists; else the shipped job of that name
    (`quickstart`, `quickstart.yaml`, or `jobs/quickstart.yaml` outside a checkout). Raises
    ConfigError naming the shipped jobs when neither exists."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists() and (p.parent == Path(".") or p.parent == Path("jobs")):
        stem = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
        if stem in shipped_jobs():
            return JOBS_DIR / f"{stem}.yaml"
    what = "not a file" if p.exists() else "no such file"
    raise ConfigError("--config", path, f"{what}, and not a shipped job (shipped: {', '.join(shipped_jobs())})")
