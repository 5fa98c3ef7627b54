"""Small experiments built in-process, the same way `python -m sfl_ray.run` builds them."""

from __future__ import annotations

from sfl_ray.config import ExperimentConfig, load_config
from sfl_ray.run import prepare
from sfl_ray.runtime.coordinator import Coordinator
from sfl_ray.runtime.launch import make_blueprint
from sfl_ray.runtime.local_backend import LocalExecutor
from sfl_ray.metrics.evaluate import Evaluator
from sfl_ray.metrics.sampling import MeasurePlan
from sfl_ray.metrics.writer import RunWriter

TIMING_KEYS = {"wall_s"}


def small_config(run_dir: str, *overrides: str) -> ExperimentConfig:
    """A few hundred MNIST samples, 4 clients, 2 rounds: seconds on a CPU."""
    base = [
        "data.max_train_samples=800", "data.max_test_samples=300", "train.num_clients=4",
        "train.batch_size=50", "train.lr=0.05", "stop.rounds=2", f"output.dir={run_dir}",
        "output.progress=false", "partition.name=dirichlet", "partition.alpha=1.0",
    ]
    return load_config(None, base + list(overrides))


def local_coordinator(cfg: ExperimentConfig) -> tuple[Coordinator, LocalExecutor]:
    """The local backend's pieces, returned so tests can look inside the server blocks."""
    return _coordinator(cfg, lambda algorithm_cls, bp, data, shards: LocalExecutor(
        algorithm_cls, bp, data.train_x, data.train_y, shards, cfg.cluster.num_servers))


def ray_coordinator(cfg: ExperimentConfig):
    """The Ray backend's pieces (its actors started), returned so tests can wrap the executor."""
    from sfl_ray.runtime.ray_backend import start_actors

    return _coordinator(cfg, lambda algorithm_cls, bp, data, shards: start_actors(
        algorithm_cls, bp, data.train_x, data.train_y, shards, cfg.cluster))


def _coordinator(cfg: ExperimentConfig, make_executor):
    algorithm_cls, data, shards, _ = prepare(cfg)
    bp = make_blueprint(cfg, data)
    ex = make_executor(algorithm_cls, bp, data, shards)
    ev = Evaluator(bp.build_parts(), data.test_x, data.test_y, cfg.train.eval_batch_size, bp.precision)
    coord = Coordinator(algorithm_cls(bp), ex, ev, RunWriter(cfg.run_dir()),
                        num_clients=cfg.train.num_clients, clients_per_round=cfg.train.sampled_count(),
                        stop=cfg.stop, cost_model=cfg.cost_model, seed=cfg.seed,
                        measure=MeasurePlan.from_config(cfg.metrics, cfg.seed, [len(s) for s in shards],
                                                        cfg.train.batch_size))
    return coord, ex


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
