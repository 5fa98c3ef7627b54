"""Run by tests/test_scale.py in a process of its own: a simulated 4-node cluster
(`ray.cluster_utils.Cluster`, every node declaring one GPU it does not have), 1,000 CSE-FSL
clients on four pools at 0.5 GPU each and one server block on a whole GPU, one round.

    python tests/scale_cluster.py RUN_DIR

Prints, as its last line, one JSON object: the nodes' resources, where every actor ran (before
the round), the round's row and each pool's number of clients holding state after it.
"""

from __future__ import annotations

import json
import sys


def main(run_dir: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from sfl_ray.metrics.evaluate import Evaluator
    from sfl_ray.metrics.writer import RunWriter
    from sfl_ray.run import prepare
    from sfl_ray.runtime.coordinator import Coordinator
    from sfl_ray.runtime.launch import make_blueprint
    from sfl_ray.runtime.ray_backend import start_actors
    from tests.helpers import small_config

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    ex = None
    try:
        cfg = small_config(run_dir, "algorithm.name=cse_fsl", "train.num_clients=1000", "train.clients_per_round=1000",
                           "data.max_train_samples=2000", "data.max_test_samples=100", "train.batch_size=2",
                           "partition.name=iid", "stop.rounds=1", "cluster.backend=ray", "cluster.num_pools=4",
                           "cluster.client_gpus=0.5", "cluster.pool_cpus=0.25", "cluster.server_gpus=1",
                           "cluster.server_cpus=0.25", "output.name=four-nodes")
        algorithm_cls, data, shards, _ = prepare(cfg)
        bp = make_blueprint(cfg, data)
        ex = start_actors(algorithm_cls, bp, data.train_x, data.train_y, shards, cfg.cluster)
        where = ex.placement()
        coord = Coordinator(algorithm_cls(bp), ex, Evaluator(bp.build_parts(), data.test_x, data.test_y, 100),
                            RunWriter(cfg.run_dir()), num_clients=1000, clients_per_round=1000, stop=cfg.stop,
                            cost_model=cfg.cost_model, seed=cfg.seed)
        coord.run()
        after = [p["client_states"] for p in ex.placement()["pools"]]
        nodes = {n["NodeID"]: {"GPU": n["Resources"].get("GPU", 0), "CPU": n["Resources"].get("CPU", 0)}
                 for n in ray.nodes() if n["Alive"]}
        for group in where.values():
            for actor in group:
                actor["clients"] = list(actor.get("clients", []))
        print(json.dumps({"nodes": nodes, "placement": where, "row": coord.writer.rows[0],
                          "client_states_after": after}), flush=True)
    finally:
        if ex is not None:
            ex.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
