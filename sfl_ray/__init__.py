"""sfl_ray: split federated learning on Ray.

`sfl_ray.run(config_or_path, **overrides) -> sfl_ray.Run` runs one experiment in this process
(see `sfl_ray.api.run`); `sfl-ray run|compare|report|sweep` is the command line.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what a type checker sees; at run time `run` is the callable module below
    from sfl_ray.api import Run, run  # noqa: F401


def __getattr__(name: str) -> Any:
    # `sfl_ray.run` is the submodule sfl_ray/run.py, which is callable (see _CallableModule
    # there). It is imported on first use: `import sfl_ray` stays light, and `python -m
    # sfl_ray.run` does not find its own module already imported under another name.
    if name == "run":
        import importlib
        return importlib.import_module("sfl_ray.run")
    if name == "Run":
        from sfl_ray.api import Run
        return Run
    raise AttributeError(f"module 'sfl_ray' has no attribute {name!r}")
