"""sfl_ray: split federated learning on Ray."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import sfl_ray` stays light: pandas comes only with the results API.
    if name in ("load_run", "load_runs"):
        from sfl_ray import results
        return getattr(results, name)
    raise AttributeError(f"module 'sfl_ray' has no attribute {name!r}")
