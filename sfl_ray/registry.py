"""Algorithms, models and data sources by name: the built-ins and the plug-ins.

Built-ins are listed below as "module:attribute" and imported on first use, so `import sfl_ray`
stays cheap. Plug-ins register with `register_algorithm`, `register_model` and `register_data`:
in a script, in a module named by the environment variable SFL_RAY_PLUGINS, or in an installed
package whose entry point (group `sfl_ray.plugins`) names the module or function that registers
them. Entry points and SFL_RAY_PLUGINS are loaded once per process, on its first lookup.

The config (`sfl_ray.config`) follows the registry: its algorithm union, its model and data
names and the plug-ins' option sections are rebuilt whenever the registry changes. Ray actors
never look a plug-in up by name: they are handed the algorithm class and the model's entry
themselves, and the modules of plug-ins registered outside entry points travel by value
(`plugin_modules`), so a plug-in defined in a script or a test module works in every actor.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, get_args, get_origin

from sfl_ray.config_base import ConfigError

ENTRY_POINT_GROUP = "sfl_ray.plugins"
ENV_VAR = "SFL_RAY_PLUGINS"  # comma-separated module names or .py files, loaded like entry points
KINDS = ("algorithm", "model", "data")

_BUILTIN: dict[str, dict[str, str]] = {
    "algorithm": {
        "fedavg": "sfl_ray.algorithms.fedavg:FedAvg",
        "sl": "sfl_ray.algorithms.sl:SplitLearning",
        "splitfed_v1": "sfl_ray.algorithms.splitfed_v1:SplitFedV1",
        "splitfed_v2": "sfl_ray.algorithms.splitfed_v2:SplitFedV2",
        "sglr": "sfl_ray.algorithms.sglr:SGLR",
        "cse_fsl": "sfl_ray.algorithms.cse_fsl:CSEFSL",
        "heron_sfl": "sfl_ray.algorithms.heron_sfl:HeronSFL",
        "fsl_sage": "sfl_ray.algorithms.fsl_sage:FSLSAGE",
        "ampere": "sfl_ray.algorithms.ampere:Ampere",
    },
    # A sequential model's module also holds its DEFAULT_CUT.
    "model": {
        "cnn": "sfl_ray.models.cnn:cnn",
        "simple_conv": "sfl_ray.models.simple_conv:simple_conv",
        "resnet18": "sfl_ray.models.resnet:resnet18",
        "vgg11": "sfl_ray.models.vgg:vgg11",
        "gpt2": "sfl_ray.models.split:build_transformer",
        "vit": "sfl_ray.models.split:build_transformer",
    },
    "data": {
        "mnist": "sfl_ray.data.sources:load_images",
        "cifar10": "sfl_ray.data.sources:load_images",
        "hf": "sfl_ray.data.sources:load_images",
        "e2e": "sfl_ray.data.text:load_e2e",
    },
}
# Built-in models whose builder cuts the model itself and returns its ModelParts (transformers).
_PARTS_BUILDERS = {"gpt2", "vit"}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # also a piece of run directory names


class PluginError(ConfigError):
    """A plug-in that cannot be loaded or registered; one line naming it (the CLI exits 2)."""

    def __init__(self, where: str, value: object, problem: str):
        super().__init__(where, value, problem)
        self.args = (f"plugin error: {where}={value!r}: {' '.join(str(problem).split())}",)


@dataclass(frozen=True)
class Entry:
    """One registered algorithm, model or data source."""

    kind: str                          # "algorithm", "model" or "data"
    name: str
    target: Any                        # the Algorithm subclass, the model builder, the data loader
    config_cls: Optional[type] = None  # algorithm: its config section; model / data: its options class
    default_cut: Optional[str] = None  # models: the device block's last layer when model.cut is unset
    source: str = "built-in"           # built-in, "module M", "entry point E (V)" or "SFL_RAY_PLUGINS"
    form: str = "sequential"           # models: "sequential" (the plug-in contract) or "parts" (transformers)
    by_value: bool = False             # ship its module to Ray actors by value (not importable there)

    @property
    def builtin(self) -> bool:
        return self.source == "built-in"


_table: dict[str, dict[str, Any]] = {k: dict(v) for k, v in _BUILTIN.items()}  # name -> Entry | "mod:attr"
_listeners: list[Callable[[], None]] = []
_plugins: dict[str, Any] = {"state": "unloaded", "error": None}
_loading: list[tuple[str, bool]] = []  # (source, by_value) of the entry point being loaded, innermost last
_version = 0


# -- registering -----------------------------------------------------------------------------
def register_algorithm(cls: type) -> type:
    """Class decorator: register an `Algorithm` subclass under its `name`.

    The class must set `name`, a `config_cls` (a `config_base.Section` whose `name` field is
    `Literal[name]` with that default: its keys become the `algorithm:` section) and implement
    `init_global`, `client_program`, `run_round` and `eval_weights`; `server_cls`, if set, is a
    `ServerProgram`. The name must be new."""
    source, by_value = _source_of(cls)
    _check_algorithm(cls, getattr(cls, "name", None), source)
    _add(Entry("algorithm", cls.name, cls, cls.config_cls, source=source, by_value=by_value))
    return cls


def register_model(name: str, config_cls: Optional[type] = None, *,
                   default_cut: Optional[str] = None) -> Callable[[Callable], Callable]:
    """Decorator on a model builder: `builder(in_shape, num_classes[, options=...]) -> nn.Sequential`.

    As the zoo's builders: `in_shape` is one sample's shape (e.g. (C, H, W)), the result an
    `nn.Sequential` of named top-level layers (the cut candidates), built under the run's model
    seed. `model.cut` names the device block's last layer, `default_cut` when unset. With a
    `config_cls` (a `Section`) the builder also gets `options=`, the validated `model.options`."""
    _check_name("model", name)
    _check_options(name, config_cls)

    def decorate(builder: Callable) -> Callable:
        if not callable(builder):
            raise TypeError(f"register_model({name!r}) decorates a builder function, not {builder!r}")
        source, by_value = _source_of(builder)
        _add(Entry("model", name, builder, config_cls, default_cut, source, by_value=by_value))
        return builder

    return decorate


def register_data(name: str, config_cls: Optional[type] = None) -> Callable[[Callable], Callable]:
    """Decorator on a data loader: `loader(cfg) -> ArrayDataset` (`cfg` is the `data:` section,
    `cfg.options` the validated `data.options` when a `config_cls` is given)."""
    _check_name("data", name)
    _check_options(name, config_cls)

    def decorate(loader: Callable) -> Callable:
        if not callable(loader):
            raise TypeError(f"register_data({name!r}) decorates a loader function, not {loader!r}")
        source, by_value = _source_of(loader)
        _add(Entry("data", name, loader, config_cls, source=source, by_value=by_value))
        return loader

    return decorate


def _source_of(obj: Any) -> tuple[str, bool]:
    if _loading:
        return _loading[-1]
    module = getattr(obj, "__module__", None) or "?"
    # Not sfl_ray's own, not __main__ (cloudpickle ships that by value anyway): a script's
    # module, a test module, a file: Ray actors may not be able to import it.
    return f"module {module}", module != "__main__" and not module.startswith("sfl_ray.")


def _add(entry: Entry) -> None:
    global _version
    have = _table[entry.kind].get(entry.name)
    if have is not None:
        if isinstance(have, Entry) and have.target is entry.target and have.config_cls is entry.config_cls:
            return  # the same thing again (a module imported twice through one path): nothing new
        was = have.source if isinstance(have, Entry) else "built-in"
        raise ValueError(f"{entry.kind} {entry.name!r} is already registered ({was}); {entry.source} "
                         f"registers another one under that name: pick another name")
    _table[entry.kind][entry.name] = entry
    _version += 1
    for fn in list(_listeners):
        fn()


def _check_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise TypeError(f"a {kind} name is a letter followed by letters, digits, '_' or '-'; got {name!r}")


def _check_options(name: str, config_cls: Optional[type]) -> None:
    if config_cls is not None:
        _check_section(config_cls, f"the options of {name!r}")


def _check_section(config_cls: Any, what: str) -> None:
    from pydantic import BaseModel

    if not (isinstance(config_cls, type) and issubclass(config_cls, BaseModel)):
        raise TypeError(f"{what}: config_cls must be a pydantic model (a sfl_ray.config_base.Section), "
                        f"not {config_cls!r}")
    if config_cls.model_config.get("extra") != "forbid":
        raise TypeError(f"{what}: {config_cls.__name__} must refuse unknown keys: derive it from "
                        "sfl_ray.config_base.Section")


def _check_algorithm(cls: Any, name: Any, where: str) -> None:
    """What the runtime relies on, checked once when the algorithm is registered or first used."""
    from sfl_ray.runtime.protocol import Algorithm, ServerProgram

    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"{where}: {cls!r} is not a subclass of sfl_ray.runtime.protocol.Algorithm")
    _check_name("algorithm", name)
    cfg = getattr(cls, "config_cls", None)
    _check_section(cfg, f"algorithm {name!r}")
    field = cfg.model_fields.get("name")
    if field is None or field.default != name or get_origin(field.annotation) is not Literal \
            or get_args(field.annotation) != (name,):
        raise TypeError(f"algorithm {cls.__name__} calls itself {name!r}, but its config_cls {cfg.__name__} needs "
                        f"name: Literal[{name!r}] = {name!r} (it tells the config's algorithm sections apart)")
    for piece in ("client_program", "run_round", "init_global", "eval_weights"):
        if getattr(cls, piece, None) is None or getattr(getattr(cls, piece), "__isabstractmethod__", False):
            raise TypeError(f"algorithm {name} is missing its {piece}")
    server = getattr(cls, "server_cls", None)
    if server is not None and not (isinstance(server, type) and issubclass(server, ServerProgram)):
        raise TypeError(f"algorithm {name}: server_cls must be a ServerProgram subclass or None, not {server!r}")


# -- looking up ------------------------------------------------------------------------------
_KEYS = {"algorithm": "algorithm.name", "model": "model.name", "data": "data.name"}


def get(kind: str, name: str, load: bool = True) -> Entry:
    """The entry registered as `name`; ConfigError naming what is allowed if there is none."""
    if load:
        load_plugins()
    if name not in _table[kind]:
        raise ConfigError(_KEYS[kind], name, f"allowed: {', '.join(_table[kind])}")
    have = _table[kind][name]
    if isinstance(have, str):
        have = _table[kind][name] = _resolve_builtin(kind, name, have)
    return have


def names(kind: str, load: bool = True) -> list[str]:
    """Every registered name of this kind: the built-ins first, then the plug-ins."""
    if load:
        load_plugins()
    return list(_table[kind])


def entries(kind: str, load: bool = True) -> list[Entry]:
    """Every entry of this kind (imports the built-ins of that kind)."""
    return [get(kind, n, load=False) for n in names(kind, load)]


def options_class(kind: str, name: str) -> Optional[type]:
    """The options class a model or data source registered with (None: it takes no options),
    without importing a built-in (built-ins take none)."""
    have = _table[kind].get(name)
    return have.config_cls if isinstance(have, Entry) else None


def version() -> int:
    """Bumped by every change: what a cache of derived types compares against."""
    return _version


def on_change(fn: Callable[[], None]) -> None:
    """Call `fn()` after every registration (and restore); the config rebuilds its types so."""
    _listeners.append(fn)


def plugin_modules() -> list[str]:
    """Modules of the plug-ins registered outside entry points (scripts, test modules, files):
    Ray actors may not import them, so the Ray backend sends them by value."""
    mods = {getattr(e.target, "__module__", None) for t in _table.values() for e in t.values()
            if isinstance(e, Entry) and e.by_value}
    mods |= {getattr(e.config_cls, "__module__", None) for t in _table.values() for e in t.values()
             if isinstance(e, Entry) and e.by_value and e.config_cls is not None}
    return sorted(m for m in mods if m and m in sys.modules and m != "__main__" and not m.startswith("sfl_ray."))


def plugin_entries() -> list[Entry]:
    """Every plug-in entry (not the built-ins): what a process that never ran the registrations
    needs to `adopt` to look plug-ins up by name (e.g. a Ray task validating configs). Sending
    them to Ray needs the Ray backend's `ship_plugins_by_value()` first."""
    return [e for t in _table.values() for e in t.values() if isinstance(e, Entry) and not e.builtin]


def adopt(plugins: list[Entry]) -> None:
    """Register `plugin_entries()` of another process here. An entry already adopted from the
    same source is replaced (unpickling makes a new function object each time)."""
    global _version
    for entry in plugins:
        have = _table[entry.kind].get(entry.name)
        if isinstance(have, Entry) and have.source == entry.source and not have.builtin:
            _table[entry.kind][entry.name] = entry
            _version += 1
            for fn in list(_listeners):
                fn()
        else:
            _add(entry)


def _resolve_builtin(kind: str, name: str, ref: str) -> Entry:
    module_name, attr = ref.split(":")
    module = importlib.import_module(module_name)
    target = getattr(module, attr)
    if kind == "algorithm":
        _check_algorithm(target, name, ref)
        if target.name != name:
            raise TypeError(f"algorithm {ref} registers as {name!r} but calls itself {target.name!r}")
        return Entry(kind, name, target, target.config_cls)
    if kind == "model":
        parts = name in _PARTS_BUILDERS
        return Entry(kind, name, target, None, None if parts else module.DEFAULT_CUT,
                     form="parts" if parts else "sequential")
    return Entry(kind, name, target)


# -- plug-ins from entry points and SFL_RAY_PLUGINS ----------------------------------------------
def load_plugins() -> None:
    """Load every entry point of the `sfl_ray.plugins` group and every SFL_RAY_PLUGINS module,
    once per process. A plug-in that fails is a PluginError naming it, raised again on every
    later lookup (a run must not go on without a plug-in the user installed)."""
    if _plugins["error"] is not None:
        raise _plugins["error"]
    if _plugins["state"] != "unloaded":
        return  # loaded, or loading (a plug-in looking something up while it registers)
    _plugins["state"] = "loading"
    try:
        for ep in _entry_points():
            where = f"entry point {ENTRY_POINT_GROUP}:{ep.name}"
            with _loading_as(f"{where} ({ep.value})", False):
                _run_plugin(where, ep.value, ep.load)
        for spec in [s.strip() for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]:
            with _loading_as(f"{ENV_VAR} {spec}", True):
                _run_plugin(ENV_VAR, spec, lambda s=spec: load_module(s))
    except PluginError as err:
        _plugins["error"] = err
        raise
    finally:
        _plugins["state"] = "loaded"


def _entry_points() -> list:
    from importlib.metadata import entry_points

    seen, out = set(), []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        if (ep.name, ep.value) not in seen:  # one distribution found twice on sys.path
            seen.add((ep.name, ep.value))
            out.append(ep)
    return out


@contextlib.contextmanager
def _loading_as(source: str, by_value: bool) -> Iterator[None]:
    _loading.append((source, by_value))
    try:
        yield
    finally:
        _loading.pop()


def _run_plugin(where: str, value: str, load: Callable[[], Any]) -> None:
    """Import what an entry point names: a module (its import registers things), a function
    (called: it registers things) or an Algorithm subclass (registered)."""
    from sfl_ray.local_paths import reason

    try:
        obj = load()
        if isinstance(obj, type):
            register_algorithm(obj)
        elif callable(obj):
            obj()
        elif not hasattr(obj, "__spec__"):  # neither a module nor a function
            raise TypeError(f"names {type(obj).__name__} {obj!r}, not a module or a function that registers plug-ins")
    except PluginError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the plug-in raised, one line naming it
        raise PluginError(where, value, f"failed to load: {reason(err)}") from None


def load_module(spec: str) -> Any:
    """Import a plug-in module by name (`pkg.module`) or file (`path/to/plugin.py`; imported as
    its stem, e.g. `plugin`)."""
    if not spec.endswith(".py"):
        return importlib.import_module(spec)
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {spec}")
    name = path.stem
    have = sys.modules.get(name)
    if have is not None and getattr(have, "__file__", None) and Path(have.__file__).resolve() == path:
        return have
    if have is not None:
        raise ImportError(f"a module named {name!r} is already imported (from {getattr(have, '__file__', '?')})")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before running it: cloudpickle and dataclasses look it up there
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# -- for tests -------------------------------------------------------------------------------
def snapshot() -> dict:
    """The registry's state, to `restore` after registering plug-ins for a while (tests)."""
    return {"table": {k: dict(v) for k, v in _table.items()}, "plugins": dict(_plugins)}


def restore(state: dict) -> None:
    """Back to a `snapshot()`: plug-ins registered since are gone (the config follows)."""
    global _version
    for k in KINDS:
        _table[k] = dict(state["table"][k])
    _plugins.update(state["plugins"])
    _version += 1
    for fn in list(_listeners):
        fn()


__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "Entry", "PluginError", "adopt", "entries", "get", "load_module",
           "load_plugins", "names", "on_change", "options_class", "plugin_entries", "plugin_modules",
           "register_algorithm", "register_data", "register_model", "restore", "snapshot", "version"]
