"""A tiny GPT-2 with the real tokenizer on the shipped E2E slice: it trains under SFL, the
perplexity falls, both backends agree, and with LoRA only the adapters move and are counted."""

import json

import numpy as np
import pytest
import torch

from sfl_ray.config import load_config
from sfl_ray.run import prepare
from sfl_ray.runtime.launch import run_experiment
from tests.helpers import local_coordinator, without_timing

TINY = ["model.name=gpt2", "model.cut=block1", "model.transformer.n_layer=2", "model.transformer.n_embd=32",
        "model.transformer.n_head=2", "model.transformer.n_positions=64", "data.name=e2e", "data.max_length=48",
        "data.max_train_samples=48", "data.max_test_samples=16", "train.num_clients=3", "train.batch_size=8",
        "train.optimizer=adam", "train.lr=0.003", "train.eval_batch_size=32", "stop.rounds=3",
        "output.progress=false"]
ALGO = {
    "fsl_sage": ["algorithm.name=fsl_sage", "algorithm.upload_every=1", "algorithm.align_every=2",
                 "algorithm.align_epochs=1", "algorithm.align_batch_size=8", "algorithm.buffer_size=16",
                 "algorithm.aux.blocks=0"],
    "heron_sfl": ["algorithm.name=heron_sfl", "algorithm.upload_every=1", "algorithm.aux.blocks=0",
                  "algorithm.zo_lr=0.0001"],
}


def _rows(cfg):
    with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("algo", ["fsl_sage", "heron_sfl"])
@pytest.mark.slow
def test_tiny_gpt2_perplexity_falls_on_both_backends(ray_cluster, run_dir, algo):
    rows = {}
    for backend in ("local", "ray"):
        cfg = load_config(None, TINY + ALGO[algo] + [f"cluster.backend={backend}", f"output.dir={run_dir}",
                                                     f"output.name={algo}-{backend}", "cluster.num_pools=1"])
        algorithm_cls, data, shards, _ = prepare(cfg)
        run_experiment(algorithm_cls, cfg, data, shards)
        rows[backend] = _rows(cfg)
    ppl = [r["eval_perplexity"] for r in rows["ray"]]
    assert ppl[-1] < ppl[0] < 60000  # falls from about the vocabulary size
    assert without_timing(rows["ray"]) == without_timing(rows["local"])
    assert all("eval_accuracy" not in r or r["eval_accuracy"] is None for r in rows["ray"])


def test_with_lora_only_adapters_change_and_only_they_cross_the_link(tmp_path):
    cfg = load_config(None, TINY + ["algorithm.name=splitfed_v2", "cluster.backend=local",
                                    f"output.dir={tmp_path}", "stop.rounds=1", "model.lora.r=4",
                                    "model.lora.target_modules=[c_attn]"])
    coord, ex = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    device0 = {k: v.clone() for k, v in ex.pool.parts.device.state_dict().items()}
    before_server = {k: v.clone() for k, v in ex.servers[0].program.model.state_dict().items()}
    row = coord.run_one_round(1)
    lora_keys = {k for k in device0 if "lora_" in k}
    assert set(coord.algorithm.global_device) == lora_keys  # only adapters are exchanged
    lora_bytes = sum(device0[k].numel() * 4 for k in lora_keys)
    assert row["bytes_by_kind"]["up/weights"] == 3 * lora_bytes
    assert row["bytes_by_kind"]["down/weights"] == 3 * lora_bytes
    after = ex.pool.parts.device.state_dict()
    moved = {k for k, v in after.items() if not torch.equal(v, device0[k])}
    assert moved and moved <= lora_keys  # frozen weights never change
    server_after = ex.servers[0].program.model.state_dict()
    changed = {k for k in server_after if not np.array_equal(server_after[k].numpy(), before_server[k].numpy())}
    assert changed and all("lora_" in k for k in changed)


def test_fsl_sage_aligns_a_transformer_block_aux_with_lora(tmp_path):
    """Alignment differentiates the aux's cut gradient (double backward through attention):
    it must run with a transformer-block aux and bring that gradient closer to the server's."""
    sage = [a for a in ALGO["fsl_sage"] if not a.startswith("algorithm.aux.blocks")]
    cfg = load_config(None, TINY + sage + ["algorithm.aux.kind=blocks", "algorithm.aux.blocks=1",
                                          "algorithm.align_epochs=6", "algorithm.aux_lr=0.003",
                                          "model.lora.r=4", "model.lora.target_modules=[c_attn]",
                                          "cluster.backend=local", f"output.dir={tmp_path}", "stop.rounds=1"])
    coord, ex = local_coordinator(cfg)
    coord.run()
    stats = ex.servers[0].program.align(0, rnd=2)
    assert stats["mse"] < stats["mse_before"], stats
    assert stats["cosine"] > stats["cosine_before"], stats
