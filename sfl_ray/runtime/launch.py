"""Build the backend for an experiment, run its coordinator, show progress on the driver."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Optional

from sfl_ray import registry
from sfl_ray.data.partition import Partition
from sfl_ray.data.sources import ArrayDataset
from sfl_ray.metrics.evaluate import Evaluator
from sfl_ray.metrics.sampling import MeasurePlan
from sfl_ray.metrics.tracking import Tracking
from sfl_ray.metrics.writer import RunWriter
from sfl_ray.runtime.coordinator import Coordinator
from sfl_ray.runtime.protocol import Algorithm, Blueprint

log = logging.getLogger("sfl_ray")
MIB = 1024 ** 2


def make_blueprint(cfg: Any, data: ArrayDataset) -> Blueprint:
    return Blueprint(model_name=cfg.model.name, cut=cfg.model.cut, in_shape=data.input_shape,
                     num_classes=data.num_classes, seed=cfg.seed, train=cfg.train, algorithm=cfg.algorithm,
                     torch_threads=cfg.cluster.torch_threads, rounds=cfg.stop.rounds, model=cfg.model,
                     count_labels=cfg.link.count_labels, augment=cfg.data.augment, measure=cfg.metrics.measure,
                     compression=cfg.link.compression, int8_scale=cfg.link.int8_scale,
                     model_entry=registry.get("model", cfg.model.name))


def format_progress(p: dict) -> str:
    """One progress line: round, clients done, loss, latest accuracy, bytes moved."""
    row = p.get("row") or {}
    acc = p.get("eval_accuracy")
    parts = [f"round {p['round']}/{p['rounds']}", f"clients {p['clients_done']}/{p['clients_total']}"]
    if row.get("round") == p["round"]:
        parts[1] = f"clients {row['clients']}/{row['clients']}"
        if row.get("train_loss") is not None:
            parts.append(f"loss {row['train_loss']:.4f}")
        parts.append(f"{row['bytes_cum'] / MIB:.1f} MiB")
        parts.append(f"{row['wall_s']:.1f}s")
    if acc is not None:
        parts.append(f"acc {acc:.4f}")
    if row.get("round") == p["round"] and row.get("eval_perplexity") is not None:
        parts.append(f"ppl {row['eval_perplexity']:.2f}")
    return " | ".join(parts)


class _Printer:
    """Prints a line per finished round (and in-round updates on a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled, self.last_round, self.tty = enabled, 0, sys.stdout.isatty()

    def __call__(self, p: dict) -> None:
        if not self.enabled:
            return
        row = p.get("row") or {}
        if row.get("round", 0) > self.last_round:
            self.last_round = row["round"]
            print(("\r" if self.tty else "") + format_progress({**p, "round": row["round"]}), flush=True)
        elif self.tty and p.get("state") == "RUNNING_ROUND":
            print("\r" + format_progress(p), end="", flush=True)


def run_experiment(algorithm_cls: type[Algorithm], cfg: Any, data: ArrayDataset, shards: Partition,
                   progress: Optional[Callable[[dict], None]] = None, resume: Optional[dict] = None) -> dict:
    """Run one experiment on the configured backend; returns the summary. `resume`: a checkpoint
    (runtime.checkpoint) to continue from."""
    shards = Partition.from_lists(shards)
    blueprint = make_blueprint(cfg, data)
    show = progress or _Printer(cfg.output.progress)
    writer = RunWriter(cfg.run_dir(), tracking=Tracking.from_config(cfg))
    common = dict(num_clients=cfg.train.num_clients, clients_per_round=cfg.train.sampled_count(),
                  stop=cfg.stop, cost_model=cfg.cost_model, seed=cfg.seed, torch_threads=cfg.cluster.torch_threads,
                  checkpoint_every=cfg.output.checkpoint_every, keep_checkpoints=cfg.output.keep_checkpoints,
                  measure=MeasurePlan.from_config(cfg.metrics, cfg.seed, shards.sizes,
                                                  cfg.train.batch_size))
    if cfg.cluster.backend == "local":
        from sfl_ray.runtime.local_backend import LocalExecutor
        import torch
        torch.set_num_threads(cfg.cluster.torch_threads)
        executor = LocalExecutor(algorithm_cls, blueprint, data.train_x, data.train_y, shards, cfg.cluster.num_servers)
        evaluator = Evaluator(blueprint.build_parts(), data.test_x, data.test_y, cfg.train.eval_batch_size,
                              blueprint.precision)
        coord = Coordinator(algorithm_cls(blueprint), executor, evaluator, writer, on_row=show, **common)
        return coord.run(coord.restore(resume) if resume else 1)
    return _run_on_ray(algorithm_cls, blueprint, cfg, data, shards, writer, common, show, resume)


def _run_on_ray(algorithm_cls, blueprint, cfg, data, shards, writer, common, show, resume=None) -> dict:
    import ray

    from sfl_ray.runtime.ray_backend import FIRST_WAIT_S, start_actors

    executor = start_actors(algorithm_cls, blueprint, data.train_x, data.train_y, shards, cfg.cluster)
    evaluator = Evaluator(blueprint.build_parts(), data.test_x, data.test_y, cfg.train.eval_batch_size,
                          blueprint.precision)
    make = ray.remote(Coordinator).options(num_cpus=0, max_concurrency=2, scheduling_strategy=_beside_driver())
    timeout = cfg.cluster.task_timeout_s or FIRST_WAIT_S
    coord = make.remote(algorithm_cls(blueprint), executor, evaluator, writer, **common)
    recoveries = 0
    try:
        start = ray.get(coord.restore.remote(resume), timeout=timeout) if resume else 1
        done = coord.run.remote(start)
        while True:
            try:
                return _wait(coord, done, show, timeout)
            except ray.exceptions.RayTaskError:
                raise  # the run itself failed: not a lost process
            except ray.exceptions.RayActorError as err:
                # The coordinator's process is gone: continue from its last checkpoint with a new
                # one (pools and server blocks live on; their state is restored from it too).
                recoveries += 1
                from sfl_ray.runtime.checkpoint import Checkpointer, CheckpointError
                try:
                    state = Checkpointer(writer).load()
                except CheckpointError:
                    raise RuntimeError(f"the coordinator was lost ({type(err).__name__}) before its first "
                                       f"checkpoint; nothing to continue from") from None
                if recoveries > 3:
                    raise
                log.warning("the coordinator was lost (%s); continuing from the checkpoint of round %d",
                            type(err).__name__, state["round"])
                executor.recover()
                coord = make.remote(algorithm_cls(blueprint), executor, evaluator, writer, **common)
                start = ray.get(coord.restore.remote(state, True), timeout=timeout)
                done = coord.run.remote(start)
    finally:
        ray.kill(coord)
        executor.shutdown()


def _beside_driver():
    """Where the coordinator goes: on the driver's node, so a local run directory is where the user
    looks. A driver that is a Ray Tune trial (sfl_ray.sweep) runs in bundle 0 of the trial's
    placement group: the coordinator joins that bundle (same node), inside the trial's reservation
    like the pools and server blocks, which the placement group captures without being told."""
    import ray
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    group = get_current_placement_group()  # None unless this process runs in a group that captures children
    if group is not None:
        return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _wait(coord, done, show, timeout: float) -> dict:
    """Show the coordinator's progress until its run returns."""
    import ray

    while True:
        ready, _ = ray.wait([done], timeout=0.5)
        try:
            show(ray.get(coord.progress.remote(), timeout=timeout))
        except ray.exceptions.RayActorError:
            pass  # the coordinator died; ray.get(done) below raises with the cause
        if ready:
            return ray.get(done)
        time.sleep(0.5)
