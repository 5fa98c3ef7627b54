"""sfl_ray: split federated learning on Ray."""

__version__ = "0.1.0"

# Public names imported on first use, so `import sfl_ray` stays cheap (no torch, pandas or Ray).
_LAZY = {
    "register_algorithm": "sfl_ray.registry",  # plug-ins (docs/extending.md)
    "register_model": "sfl_ray.registry",
    "register_data": "sfl_ray.registry",
    "load_run": "sfl_ray.results",  # the results API (pandas)
    "load_runs": "sfl_ray.results",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sfl_ray' has no attribute {name!r}")
