"""metrics.measure: sampled measurement reports the FLOPs of exact measurement (each step shape is
measured once, then reused), tracks memory on a sample of clients, and never changes training;
off measures nothing and says so."""

import pytest

from tests.helpers import local_coordinator, small_config, without_timing

ALGORITHMS = ["fedavg", "sl", "splitfed_v1", "splitfed_v2", "sglr", "cse_fsl", "heron_sfl", "fsl_sage", "ampere"]
SERVER_CACHED = ["sl", "splitfed_v1", "splitfed_v2", "sglr", "cse_fsl", "heron_sfl", "fsl_sage"]
COST_KEYS = ("device_flops", "device_peak_mem_bytes", "device_cuda_peak_mem_bytes", "server_flops", "sim_s",
             "sim_cum_s", "measure", "mem_clients")


def _run(run_dir, algo, measure, *extra):
    # batch 48 over uneven Dirichlet shards: full and partial batches, clients below one batch
    cfg = small_config(run_dir, f"algorithm.name={algo}", f"metrics.measure={measure}", "train.optimizer=adam",
                       "train.lr=0.001", "train.batch_size=48", "train.num_clients=5", "stop.rounds=2",
                       "partition.alpha=0.5", f"output.name={algo}-{measure}", *extra)
    coord, ex = local_coordinator(cfg)
    summary = coord.run()
    return coord.writer.rows, summary, ex


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_sampled_reports_the_exact_flops_and_trains_identically(run_dir, algo):
    exact, _, _ = _run(run_dir, algo, "exact")
    sampled, summary, ex = _run(run_dir, algo, "sampled")
    assert [r["device_flops"] for r in sampled] == [r["device_flops"] for r in exact]
    assert [r["server_flops"] for r in sampled] == [r["server_flops"] for r in exact]
    assert [r["sim_s"] for r in sampled] == [r["sim_s"] for r in exact]
    assert all(r["device_flops"] > 0 for r in exact if r["clients"] and r.get("phase") in (None, "device"))
    # measurement never changes what is trained or sent
    strip = lambda rows: [{k: v for k, v in r.items() if k not in COST_KEYS} for r in without_timing(rows)]  # noqa: E731
    assert strip(sampled) == strip(exact)
    # the saving is real: most steps were not observed op by op, and no step's FLOPs varied within a key
    assert ex.pool.flop_cache.hits > ex.pool.flop_cache.misses
    assert ex.pool.flop_cache.conflicts == []
    if algo in SERVER_CACHED:  # and at the server block: per request shape, or per schedule call's shapes
        server = ex.servers[0].flop_cache
        assert server.hits > server.misses
    # memory: exact tracks every client; sampled one per round, from clients holding a full batch
    for e, s in zip(exact, sampled):
        if s["clients"] and e["device_peak_mem_bytes"]:
            assert s["mem_clients"] == 1 and e["mem_clients"] == e["clients"]
            assert 0 < s["device_peak_mem_bytes"] <= e["device_peak_mem_bytes"]
    assert summary["totals"]["measure"] == "sampled"


def test_sampled_memory_equals_exact_where_the_shapes_repeat(run_dir):
    # equal shards of whole batches: every client's peak is the same, so the sample is the peak
    extra = ("partition.name=iid", "data.max_train_samples=960", "train.num_clients=5", "train.batch_size=48")
    for algo in ("splitfed_v2", "fedavg", "cse_fsl"):
        exact, _, _ = _run(run_dir, algo, "exact", *extra)
        sampled, _, _ = _run(run_dir, algo, "sampled", *extra)
        assert [r["device_peak_mem_bytes"] for r in sampled] == [r["device_peak_mem_bytes"] for r in exact]


def test_memory_every_leaves_other_rounds_unmeasured(run_dir):
    rows, summary, _ = _run(run_dir, "splitfed_v2", "sampled", "metrics.memory_every=2", "stop.rounds=3",
                            "metrics.memory_clients=2")
    assert [r["mem_clients"] for r in rows] == [2, 2, 0]
    assert rows[2]["device_peak_mem_bytes"] is None and rows[2]["device_flops"] > 0
    assert summary["totals"]["device_peak_mem_bytes"] == max(r["device_peak_mem_bytes"] for r in rows[:2])


def test_off_measures_nothing_and_says_so(run_dir):
    exact, _, _ = _run(run_dir, "splitfed_v2", "exact")
    off, summary, ex = _run(run_dir, "splitfed_v2", "off")
    for r in off:
        assert r["measure"] == "off"
        assert r["device_flops"] is None and r["device_peak_mem_bytes"] is None and r["server_flops"] is None
        assert r["sim_s"] is None and r["sim_cum_s"] is None and r["mem_clients"] == 0
    t = summary["totals"]
    assert t["measure"] == "off" and t["device_flops"] is None and t["sim_s"] is None
    assert t["device_peak_mem_bytes"] is None
    assert [r["eval_accuracy"] for r in off] == [r["eval_accuracy"] for r in exact]
    assert [r["bytes_cum"] for r in off] == [r["bytes_cum"] for r in exact]
    assert ex.pool.flop_cache.hits == ex.pool.flop_cache.misses == 0
