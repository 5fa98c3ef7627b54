"""sfl_ray: split federated learning on Ray.

`sfl_ray.run(config_or_path, **overrides) -> sfl_ray.Run` runs one experiment in this process
(see `sfl_ray.api.run`); `sfl_ray.load_run` / `load_runs` read runs back as pandas DataFrames;
`sfl_ray.register_algorithm` / `register_model` / `register_data` add plug-ins
(docs/extending.md); `sfl-ray run|compare|report|sweep` is the command line.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what a type checker sees; at run time `run` is the callable module below
    from sfl_ray.api import Run, run  # noqa: F401
    from sfl_ray.registry import register_algorithm, register_data, register_model  # noqa: F401
    from sfl_ray.results import load_run, load_runs  # noqa: F401

# Public names imported on first use, so `import sfl_ray` stays cheap (no torch, pandas or Ray).
_LAZY = {
    "Run": "sfl_ray.api",
    "register_algorithm": "sfl_ray.registry",
    "register_model": "sfl_ray.registry",
    "register_data": "sfl_ray.registry",
    "load_run": "sfl_ray.results",
    "load_runs": "sfl_ray.results",
}


def __getattr__(name: str) -> Any:
    import importlib

    # `sfl_ray.run` is the submodule sfl_ray/run.py, which is callable (see _CallableModule
    # there). It is imported on first use: `import sfl_ray` stays light, and `python -m
    # sfl_ray.run` does not find its own module already imported under another name.
    if name == "run":
        return importlib.import_module("sfl_ray.run")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sfl_ray' has no attribute {name!r}")
