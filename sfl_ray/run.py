"""CLI entry: python -m sfl_ray.run --config FILE [--set KEY=VALUE ...]

Exit 0 on success, 2 on a bad config or bad arguments (one line naming the key, the value and
what is allowed; nothing is written), 1 on a failure while running (a client error, a NaN/Inf
loss or upload).

Order matters: every check that can fail with exit 2 — config, run directory, data, model, and
on Ray the cluster topology — runs before the run directory is claimed, so a refused run leaves
nothing on disk.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2
log = logging.getLogger("sfl_ray")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 as well; keep it one line
        print(f"sfl_ray.run: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_CONFIG)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = _Parser(prog="python -m sfl_ray.run", description="Train a split model across many clients.")
    p.add_argument("--config", required=True, help="YAML job file (see jobs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.01 (repeatable)")
    return p.parse_args(argv)


def prepare(cfg):
    """Everything that can be checked before any actor starts: the algorithm, the data, the
    partition, the model, its cut and the auxiliary head. Raises ConfigError."""
    from sfl_ray.algorithms import get_algorithm
    from sfl_ray.data import label_histograms, load_source, partition
    from sfl_ray.models.split import build_parts

    algorithm_cls = get_algorithm(cfg.algorithm.name)
    if (algorithm_cls.wants_server_blocks(cfg.algorithm) and algorithm_cls.max_servers is not None
            and cfg.cluster.num_servers > algorithm_cls.max_servers):
        from sfl_ray.config_base import ConfigError
        raise ConfigError("cluster.num_servers", cfg.cluster.num_servers,
                          f"{cfg.algorithm.name} trains one server model: at most {algorithm_cls.max_servers}")
    if getattr(cfg.algorithm, "server_trainer", "actor") == "ray_train" and cfg.cluster.backend != "ray":
        from sfl_ray.config_base import ConfigError
        raise ConfigError("algorithm.server_trainer", "ray_train", "needs cluster.backend=ray (or use 'actor')")
    data = load_source(cfg.data)
    from sfl_ray.config_base import ConfigError
    if cfg.data.augment != "none" and (data.task != "classification" or len(data.input_shape) != 3):
        raise ConfigError("data.augment", cfg.data.augment, f"needs images (C, H, W); {cfg.data.name} gives "
                          f"{data.task} inputs of shape {data.input_shape}: use none")
    keys, n_keys = data.train_y, data.num_classes
    if cfg.partition.field is not None or (data.task == "lm" and cfg.partition.name != "iid"):
        field = cfg.partition.field
        if field not in data.groups:
            raise ConfigError("partition.field", field, f"a metadata field of this data set: "
                              f"{', '.join(k for k in data.groups if not k.endswith('_names')) or 'none'}")
        keys = np.asarray(data.groups[field])
        n_keys = int(keys.max()) + 1
    shards = partition(keys, cfg.partition, cfg.train.num_clients, cfg.seed)
    if min(len(s) for s in shards) == 0:
        raise ConfigError("train.num_clients", cfg.train.num_clients, "some clients would hold no samples")
    parts = build_parts(cfg.model.name, cfg.model.cut, data.input_shape, data.num_classes, cfg.seed, cfg.model)
    aux_cfg = getattr(cfg.algorithm, "aux", None)
    if aux_cfg is not None:  # as every process will build it: its errors (budget, nothing to train) come now
        from sfl_ray.models.aux import build_aux
        build_aux(aux_cfg, parts.act_shape, data.num_classes, cfg.seed, parts.aux_factory, server=parts.server)
    hist = label_histograms(keys, shards, n_keys) if keys.ndim == 1 else None
    return algorithm_cls, data, shards, hist


def _init_ray(cfg) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    # No address and no job cluster: start a new local Ray instance. Not ray.init()'s default,
    # which joins whatever /tmp/ray/ray_current_cluster names and waits for ever if that head died.
    ray.init(address=address or "local", include_dashboard=False if address is None else None,
             logging_level=logging.WARNING, log_to_driver=True)


def _check_topology(cfg, algorithm_cls, shards) -> None:
    """The cluster must hold the pools and server blocks (needs Ray up); raises ConfigError."""
    from sfl_ray.runtime.ray_backend import plan_topology

    plan_topology(cfg.cluster, len(shards), algorithm_cls.wants_server_blocks(cfg.algorithm))


def _failed(err: BaseException) -> int:
    from sfl_ray.runtime.coordinator import ClientFailed
    from sfl_ray.runtime.finite import NonFiniteError

    first = (str(err).strip().splitlines() or [repr(err)])[0]
    if isinstance(err, NonFiniteError) or "NonFiniteError: " in first:  # the one line says it all
        log.error("run failed: %s (training diverged: lower the learning rate?)", first.split("NonFiniteError: ")[-1])
    else:  # a client failure already carries the client's traceback; others need their own
        log.error("run failed: %s", err, exc_info=not isinstance(err, ClientFailed))
    return EXIT_FAILED


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sfl_ray.config import dump_config, load_config
    from sfl_ray.config_base import ConfigError
    from sfl_ray.metrics.run_dir import check_run_dir, claim_run_dir

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_run_dir(cfg)  # cheap, so before the data: a taken name fails fast
        algorithm_cls, data, shards, hist = prepare(cfg)
        if cfg.cluster.backend == "ray":
            _init_ray(cfg)
            _check_topology(cfg, algorithm_cls, shards)
        # `--resume RUN_DIR` (to come) opens its existing run directory here instead of claiming one.
        run_dir = claim_run_dir(cfg, dump_config(cfg))
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EXIT_BAD_CONFIG
    except Exception as err:  # noqa: BLE001 - e.g. Ray would not start: report, exit 1
        return _failed(err)

    from sfl_ray.metrics.writer import RunWriter
    from sfl_ray.runtime.launch import run_experiment

    RunWriter(run_dir.path).write_json("partition.json", {"num_clients": len(shards), "sizes": [len(s) for s in shards],
                                                          "label_histograms": hist})
    print(f"sfl_ray: {cfg.algorithm.name} on {cfg.data.name}/{cfg.model.name}, {cfg.train.num_clients} clients, "
          f"backend {cfg.cluster.backend}; run dir {cfg.run_dir()}", flush=True)
    try:
        summary = run_experiment(algorithm_cls, cfg, data, shards)
    except ConfigError as err:  # a check only the running backend can make: leave nothing behind
        run_dir.release()
        print(str(err), file=sys.stderr)
        return EXIT_BAD_CONFIG
    except Exception as err:  # noqa: BLE001 - report, exit 1
        return _failed(err)
    final = summary.get("final") or {}
    metric = ("eval_perplexity" if final.get("eval_perplexity") is not None else "eval_accuracy")
    print(f"sfl_ray: done after {summary['rounds']} rounds ({summary['stop_reason']}); "
          f"{metric}={final.get(metric)} GiB={summary['totals']['gib']:.4f}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
