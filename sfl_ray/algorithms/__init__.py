"""The algorithms, one file each, looked up by name through `sfl_ray.registry` (which lists the
built-in ones and holds the plug-ins).

The registry refuses an algorithm without a client half, a schedule, or a config whose
`name` matches its own.
"""

from __future__ import annotations

from sfl_ray import registry


def algorithm_names() -> list[str]:
    """Every algorithm's name: the built-ins, then the plug-ins."""
    return registry.names("algorithm")


def get_algorithm(name: str):
    """The algorithm class registered as `name` (ConfigError naming the allowed ones if none)."""
    return registry.get("algorithm", name).target


def algorithm_config_classes(load_plugins: bool = True) -> list:
    """Every algorithm's config class (the members of the config's discriminated union)."""
    return [e.config_cls for e in registry.entries("algorithm", load=load_plugins)]
