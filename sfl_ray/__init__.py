"""sfl_ray: split federated learning on Ray."""

__version__ = "0.1.0"

# Plug-in decorators (docs/extending.md), imported on first use so `import sfl_ray` stays cheap.
_PLUGIN_API = ("register_algorithm", "register_model", "register_data")


def __getattr__(name: str):
    if name in _PLUGIN_API:
        from sfl_ray import registry
        return getattr(registry, name)
    raise AttributeError(f"module 'sfl_ray' has no attribute {name!r}")
