"""The FSL-SAGE reference setting (jobs/fslsage_reference_cifar10.yaml: simple_conv cut at the
flatten, linear aux, q=5, l=10, batch 128, labels uncounted) accounted exactly as the reference
code counts it: the bytes of every round of FedAvg, SplitFed v1/v2, CSE-FSL and FSL-SAGE equal
closed forms derived from the spec (section 1.1: numel x 4 bytes, 2x model per client per round,
activations up, gradients down, aux down on alignment rounds only for FSL-SAGE, 2x aux for
CSE-FSL) and the model's sizes, to the byte."""

from __future__ import annotations

import pytest

from sfl_ray.algorithms.common import upload_batches
from sfl_ray.config import load_config
from tests.helpers import local_coordinator
from tests.test_augment import write_tiny_cifar

ACT = 64 * 8 * 8 * 4                      # fp32 bytes of one sample's activations at the cut
DEVICE = 4 * (3 * 64 * 25 + 64 + 64 * 64 * 25 + 64)                      # conv5x5 3->64, 64->64
SERVER = 4 * (4096 * 384 + 384 + 384 * 192 + 192 + 192 * 10 + 10)       # the three Linear layers
AUX = 4 * (4096 * 10 + 10)                                               # Linear 4096 -> 10
B, Q, L = 4, 5, 2  # batch 4 so that each client's 22 samples make 6 batches, the last one short


def test_the_model_sizes_are_the_reference_models():
    assert (DEVICE, SERVER, AUX) == (429_312, 6_596_392, 163_880)


def closed_form(algo: str, rnd: int, sizes: list[int]) -> dict[str, int]:
    """Bytes by kind of one round with every client sampled (the reference's setting)."""
    n = len(sizes)
    k = [-(-s // B) for s in sizes]
    uploaded = sum(min(B, s - j * B) for s, kk in zip(sizes, k) for j in range(kk) if upload_batches(j, kk, Q, "first"))
    if algo == "fedavg":
        return {"down/weights": n * (DEVICE + SERVER), "up/weights": n * (DEVICE + SERVER)}
    if algo in ("splitfed_v1", "splitfed_v2"):
        return {"down/weights": n * DEVICE, "up/weights": n * DEVICE,
                "up/activations": sum(sizes) * ACT, "down/gradients": sum(sizes) * ACT}
    if algo == "cse_fsl":
        return {"down/weights": n * DEVICE, "up/weights": n * DEVICE, "down/aux_weights": n * AUX,
                "up/aux_weights": n * AUX, "up/activations": uploaded * ACT}
    out = {"down/weights": n * DEVICE, "up/weights": n * DEVICE, "up/activations": uploaded * ACT}
    if (rnd - 1) % L == 0:  # alignment rounds 1, 1 + l, ...: each client's aligned aux comes down once
        out["down/aux_weights"] = n * AUX
    return out


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["fedavg", "splitfed_v1", "splitfed_v2", "cse_fsl", "fsl_sage"])
def test_bytes_per_round_equal_the_reference_accounting(tmp_path, algo):
    data = write_tiny_cifar(tmp_path / "cifar", n_train=220, n_test=10, classes=10)
    own = {"cse_fsl": ["algorithm.upload_every=5", "algorithm.aux.kind=linear"],
           "fsl_sage": ["algorithm.upload_every=5", "algorithm.aux.kind=linear", f"algorithm.align_every={L}",
                        "algorithm.align_epochs=1"]}.get(algo, [])
    cfg = load_config("jobs/fslsage_reference_cifar10.yaml", [
        f"algorithm.name={algo}", *own, f"data.path={data}", f"train.batch_size={B}", "stop.rounds=3",
        "cluster.backend=local", "cluster.num_pools=1", "cluster.client_gpus=0", "cluster.server_gpus=0",
        f"output.dir={tmp_path}/runs", "output.progress=false", "data.augment=none"])
    assert cfg.link.count_labels is False and cfg.train.batch_size == B
    coord, ex = local_coordinator(cfg)
    coord.run()
    sizes = [len(ex.pool.shards[c]) for c in range(10)]
    assert sizes == [22] * 10  # Dirichlet(1.0) with equal-size clients
    for rnd, row in enumerate(coord.writer.rows, start=1):
        expected = closed_form(algo, rnd, sizes)
        assert row["bytes_by_kind"] == expected, (rnd, row["bytes_by_kind"], expected)
        assert row["bytes_up"] + row["bytes_down"] == sum(expected.values())
        assert "up/labels" not in row["bytes_by_kind"]  # the reference does not count labels


def test_the_full_reference_job_per_round_bytes():
    """The same closed forms at the job's own size (n_i = 5000, B = 128: 40 batches, uploads at
    k = 0, 5, ..., 35), as the reference code's comm_load would log them."""
    global B
    b, B = B, 128
    try:
        sizes = [5000] * 10
        assert sum(closed_form("fsl_sage", 2, sizes).values()) == 10 * (8 * 128 * ACT + 2 * DEVICE) == 176_358_400
        assert sum(closed_form("fsl_sage", 1, sizes).values()) == 176_358_400 + 10 * AUX
        assert sum(closed_form("cse_fsl", 2, sizes).values()) == 10 * (8 * 128 * ACT + 2 * DEVICE + 2 * AUX)
        assert sum(closed_form("splitfed_v2", 2, sizes).values()) == 10 * (2 * 5000 * ACT + 2 * DEVICE)
        assert sum(closed_form("fedavg", 2, sizes).values()) == 20 * (DEVICE + SERVER)
    finally:
        B = b
