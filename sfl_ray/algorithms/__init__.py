"""The algorithm registry: one file per algorithm, looked up by name.

The registry refuses an algorithm without a client half, a schedule, or a config whose
`name` matches its own.
"""

from __future__ import annotations

import importlib

from sfl_ray.config_base import ConfigError

_MODULES = {
    "fedavg": "sfl_ray.algorithms.fedavg:FedAvg",
    "sl": "sfl_ray.algorithms.sl:SplitLearning",
    "splitfed_v1": "sfl_ray.algorithms.splitfed_v1:SplitFedV1",
    "splitfed_v2": "sfl_ray.algorithms.splitfed_v2:SplitFedV2",
    "sglr": "sfl_ray.algorithms.sglr:SGLR",
    "cse_fsl": "sfl_ray.algorithms.cse_fsl:CSEFSL",
    "heron_sfl": "sfl_ray.algorithms.heron_sfl:HeronSFL",
    "fsl_sage": "sfl_ray.algorithms.fsl_sage:FSLSAGE",
    "ampere": "sfl_ray.algorithms.ampere:Ampere",
}
_CACHE: dict = {}


def _load(name: str):
    if name not in _CACHE:
        mod, cls = _MODULES[name].split(":")
        algo = getattr(importlib.import_module(mod), cls)
        if algo.name != name or algo.config_cls.model_fields["name"].default != name:
            raise TypeError(f"algorithm {_MODULES[name]} registers as {name!r} but calls itself {algo.name!r}")
        for piece in ("client_program", "run_round", "init_global", "eval_weights"):
            if getattr(algo, piece, None) is None or getattr(getattr(algo, piece), "__isabstractmethod__", False):
                raise TypeError(f"algorithm {name} is missing its {piece}")
        _CACHE[name] = algo
    return _CACHE[name]


def algorithm_names() -> list[str]:
    return list(_MODULES)


def get_algorithm(name: str):
    """The algorithm class registered as `name`."""
    if name not in _MODULES:
        raise ConfigError("algorithm.name", name, f"allowed: {', '.join(_MODULES)}")
    return _load(name)


def algorithm_config_classes() -> list:
    """Every algorithm's config class (the members of the config's discriminated union)."""
    return [_load(n).config_cls for n in _MODULES]
