"""`ServerFit` on Ray Train: a TorchTrainer (DDP over `cluster.num_servers` workers, on GPUs when
`cluster.server_gpus` > 0) fed by a Ray Data dataset of the consolidated activations.

The devices' transfers arrive as bulk handles (runtime.bulk): a task that takes no CPU reads
them from the object store, consolidates and shuffles them into one Arrow table there, and the
dataset is made from that table's reference; the coordinator never holds the arrays.

Each epoch every worker reports its loss; rank 0 also reports a checkpoint of the server
block, so the coordinator gets the weights after every epoch (one metrics row per epoch).
Checkpoints live on `cluster.storage_path`, shared storage that others may write: they hold
tensors only (safetensors), so reading one back cannot run code in the coordinator.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from sfl_ray.metrics.device_cost import FlopCounter
from sfl_ray.runtime.precision import autocast
from sfl_ray.runtime.server_fit import ServerFit, consolidate, train_epoch
from sfl_ray.runtime.wire import Weights, load_weights, to_device, to_numpy
from sfl_ray.seeding import derive_seed

CHECKPOINT_FILE = "server.safetensors"


def save_server_state(module: nn.Module, directory: str) -> None:
    """The module's state dict as plain tensors (no pickle) in `directory`."""
    # Own contiguous CPU copies: safetensors refuses tensors that share storage (tied weights).
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()},
              os.path.join(directory, CHECKPOINT_FILE))


def load_server_state(directory: str) -> Weights:
    """The weights `save_server_state` wrote, as numpy arrays; nothing in the file is executed."""
    # Copies: the file may be memory-mapped, and shared storage can change under a mapping.
    return {k: to_numpy(v, copy=True) for k, v in load_file(os.path.join(directory, CHECKPOINT_FILE)).items()}


def _loop(config: dict) -> None:
    """The per-worker training loop (runs inside Ray Train workers)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    bp, req = config["blueprint"], config["request"]
    torch.set_num_threads(bp.torch_threads)
    model = bp.build_parts().server
    load_weights(model, req.init_weights)
    model = ray.train.torch.prepare_model(model)  # DDP when there are several workers
    opt = bp.make_optimizer(model.parameters(), req.lr)
    shard = ray.train.get_dataset_shard("train")
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    for epoch in range(req.epochs):
        seed = derive_seed(req.seed, "ampere_server", epoch) % (2 ** 31)
        batches = ((to_device(b["z"], device), to_device(b["y"], device), b["owner"].numpy())
                   for b in shard.iter_torch_batches(
                       batch_size=req.batch_size, local_shuffle_buffer_size=req.num_samples if req.shuffle else None,
                       local_shuffle_seed=seed if req.shuffle else None, device="cpu"))
        counter = FlopCounter()
        with counter, autocast(bp.precision, device):
            stats = train_epoch(model, opt, batches)
        stats["flops"] = float(counter.flops)
        if ctx.get_world_size() > 1:  # sum the workers' shares
            t = torch.tensor([stats[k] for k in ("loss_sum", "count", "devices_per_batch_sum", "batches", "flops")],
                             dtype=torch.float64)
            dist.all_reduce(t)
            stats = dict(zip(("loss_sum", "count", "devices_per_batch_sum", "batches", "flops"), t.tolist()))
        metrics = {"epoch": epoch, **stats}
        if ctx.get_world_rank() == 0:
            with tempfile.TemporaryDirectory() as d:
                save_server_state(model.module if hasattr(model, "module") else model, d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def training_table(parts: list, shuffle: bool, seed: int):
    """The devices' transfers (bulk handles, resolved and decoded here) as one Arrow table of
    z, y, owner; shuffled across devices before the split over workers, so every worker's shard
    mixes all devices (each epoch then reshuffles locally with its own seed)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from sfl_ray.runtime.bulk import resolve
    from sfl_ray.runtime.channels import fetch_bulk

    z, y, owner = consolidate(resolve(parts, fetch_bulk))
    order = np.arange(len(y))
    if shuffle:
        order = np.random.default_rng(derive_seed(seed, "ampere_server_global")).permutation(len(y))
    return pa.table({"z": ArrowTensorArray.from_numpy(np.ascontiguousarray(z[order])),
                     "y": y[order].astype(np.int64), "owner": owner[order].astype(np.int64)})


def fit_with_ray_train(blueprint, req: ServerFit, cluster, storage_path: str) -> list[dict]:
    """Run the fit; returns, per epoch, the loss, mixing, FLOPs and the server weights."""
    import ray.data
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # One ready-made Arrow table: the shards are read without any Ray Data task, so the fit
    # cannot stall when the pools and the Train workers hold every CPU of the cluster; the task
    # that makes it takes no CPU for the same reason.
    table = ray.remote(num_cpus=0)(training_table).remote(req.parts, req.shuffle, req.seed)
    ds = ray.data.from_arrow_refs([table])
    use_gpu = cluster.server_gpus > 0
    trainer = TorchTrainer(
        _loop, train_loop_config={"blueprint": blueprint, "request": req},  # handles, not arrays
        scaling_config=ScalingConfig(num_workers=cluster.num_servers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cluster.server_cpus,
                                                           **({"GPU": cluster.server_gpus} if use_gpu else {})}),
        datasets={"train": ds},
        run_config=RunConfig(storage_path=storage_path, name=f"server-fit-{uuid.uuid4().hex[:8]}",
                             checkpoint_config=CheckpointConfig(num_to_keep=None)))
    result = trainer.fit()
    out = []
    for ckpt, metrics in sorted(result.best_checkpoints, key=lambda cm: cm[1]["epoch"]):
        with ckpt.as_directory() as d:
            weights = load_server_state(d)
        out.append({"loss": metrics["loss_sum"] / max(metrics["count"], 1), "flops": int(metrics["flops"]),
                    "server_batch_devices_mean": metrics["devices_per_batch_sum"] / max(metrics["batches"], 1),
                    "samples": int(metrics["count"]), "weights": weights})
    if len(out) != req.epochs:
        raise RuntimeError(f"Ray Train reported {len(out)} of {req.epochs} epochs")
    return out
