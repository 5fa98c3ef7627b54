"""Under LoRA, every block and aux head sends exactly its trainable tensors: the bytes by kind in
a round's metrics row equal what freshly built modules say is trainable, and no frozen name is
ever in what goes on the link. An aux with nothing to train is refused before anything starts."""

from __future__ import annotations

import pytest
import torch.nn as nn

pytest.importorskip("transformers")

from sfl_ray.config import load_config  # noqa: E402
from sfl_ray.config_base import ConfigError  # noqa: E402
from sfl_ray.models.aux import build_aux  # noqa: E402
from sfl_ray.models.split import build_parts  # noqa: E402
from sfl_ray.run import main, prepare  # noqa: E402
from sfl_ray.runtime.wire import module_weights  # noqa: E402
from tests.helpers import local_coordinator  # noqa: E402

CLIENTS = 3
GPT2 = ["model.name=gpt2", "model.cut=block1", "model.transformer.n_layer=3", "model.transformer.n_embd=32",
        "model.transformer.n_head=2", "model.transformer.n_positions=64", "data.name=e2e", "data.max_length=64",
        "data.max_train_samples=12", "data.max_test_samples=4", f"train.num_clients={CLIENTS}",
        "train.batch_size=4", "train.optimizer=adam", "train.lr=0.003", "train.eval_batch_size=4",
        "stop.rounds=1", "output.progress=false", "cluster.backend=local", "model.lora.r=8",
        "model.lora.target_modules=[c_attn]"]
ALGO = {
    "cse_fsl": ["algorithm.name=cse_fsl", "algorithm.upload_every=2"],
    "fsl_sage": ["algorithm.name=fsl_sage", "algorithm.upload_every=2", "algorithm.align_epochs=1",
                 "algorithm.align_batch_size=4", "algorithm.buffer_size=4"],
    "heron_sfl": ["algorithm.name=heron_sfl", "algorithm.upload_every=2"],  # CSE-FSL's schedule, ZO steps
}
AUX = {
    "linear": ["algorithm.aux.kind=linear"],
    "blocks": ["algorithm.aux.kind=blocks", "algorithm.aux.blocks=1"],
    "blocks_from_server": ["algorithm.aux.kind=blocks", "algorithm.aux.blocks=1",
                           "algorithm.aux.init_from_server=true"],
}
# What each aux kind trains (and so sends) under LoRA on c_attn: see README, "Auxiliary heads under LoRA".
# peft names an adapter's matrices `<layer>.lora_A.default.weight` and `<layer>.lora_B.default.weight`.
AUX_TRAINABLE = {
    "linear": {"lm_head.lora_A.default.weight", "lm_head.lora_B.default.weight"},
    "blocks": {"h.0.attn.c_attn.lora_A.default.weight", "h.0.attn.c_attn.lora_B.default.weight"},
    "blocks_from_server": {"h.0.attn.c_attn.lora_A.default.weight", "h.0.attn.c_attn.lora_B.default.weight"},
}


def trainable(module: nn.Module) -> dict[str, int]:
    """Name -> bytes of every parameter that trains."""
    return {n: p.numel() * p.element_size() for n, p in module.named_parameters() if p.requires_grad}


def frozen(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not p.requires_grad}


def fresh_modules(cfg) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(device, server, aux) built from scratch, independently of the run."""
    _, data, _, _ = prepare(cfg)
    parts = build_parts(cfg.model.name, cfg.model.cut, data.input_shape, data.num_classes, cfg.seed, cfg.model)
    aux = build_aux(cfg.algorithm.aux, parts.act_shape, data.num_classes, cfg.seed, parts.aux_factory)
    return parts.device, parts.server, aux


def assert_sends_exactly_trainable(module: nn.Module) -> None:
    sent = module_weights(module)
    assert set(sent) == set(trainable(module))
    assert not set(sent) & frozen(module)
    assert sum(a.nbytes for a in sent.values()) == sum(trainable(module).values())


@pytest.mark.parametrize("aux_kind", list(AUX))
@pytest.mark.parametrize("algo", list(ALGO))
def test_gpt2_lora_round_moves_exactly_the_trainable_bytes(tmp_path, algo, aux_kind):
    cfg = load_config(None, GPT2 + ALGO[algo] + AUX[aux_kind] + [f"output.dir={tmp_path}"])
    device, server, aux = fresh_modules(cfg)
    assert set(trainable(aux)) == AUX_TRAINABLE[aux_kind]
    head = "lm_head.base_layer.weight" if aux_kind == "linear" else "lm_head.weight"  # adapted or plain, frozen
    assert {"ln_f.weight", "ln_f.bias", head} <= frozen(aux)
    assert not frozen(aux) & set(trainable(aux))
    for m in (device, server, aux):
        assert_sends_exactly_trainable(m)
    assert all("lora_" in n for n in trainable(device)) and all("lora_" in n for n in trainable(server))
    dev_bytes, aux_bytes = sum(trainable(device).values()), sum(trainable(aux).values())

    coord, ex = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    row = coord.run_one_round(1)
    kinds = {k: v for k, v in row["bytes_by_kind"].items() if k.endswith("weights")}
    expect = {"down/weights": CLIENTS * dev_bytes, "up/weights": CLIENTS * dev_bytes,
              "down/aux_weights": CLIENTS * aux_bytes}  # FSL-SAGE: round 1 aligns, the aux goes down
    if algo != "fsl_sage":
        expect["up/aux_weights"] = CLIENTS * aux_bytes  # FedAvg'd: back up as well
        assert set(coord.algorithm.global_aux) == AUX_TRAINABLE[aux_kind]
    assert kinds == expect
    # The aux the pool trained (FSL-SAGE's device turns its grads off) still sends only the trainable names.
    pool_aux = ex.pool.algorithm.aux_module(ex.pool.parts)
    assert set(module_weights(pool_aux)) == AUX_TRAINABLE[aux_kind]
    assert set(coord.algorithm.global_device) == set(trainable(device))


def test_gpt2_linear_aux_head_adapter_uses_the_model_lora_and_starts_as_the_plain_head(tmp_path):
    cfg = load_config(None, GPT2 + ALGO["cse_fsl"] + AUX["linear"] + ["model.lora.alpha=4", f"output.dir={tmp_path}"])
    _, server, aux = fresh_modules(cfg)
    _, _, again = fresh_modules(cfg)
    head, a, b = aux.lm_head, aux.lm_head.lora_A["default"].weight, aux.lm_head.lora_B["default"].weight
    assert head.r["default"] == 8 and head.scaling["default"] == 4 / 8 and tuple(a.shape) == (8, 32)
    assert b.abs().sum() == 0  # B = 0: the aux equals norm + the server's head at start
    assert (a == again.lm_head.lora_A["default"].weight).all()  # deterministic from the aux seed
    assert (head.base_layer.weight == server.lm_head.weight).all()


def test_vit_linear_aux_trains_its_fresh_classifier_whole(tmp_path):
    cfg = load_config(None, [
        "model.name=vit", "model.cut=block1", "model.transformer.n_layer=2", "model.transformer.n_embd=32",
        "model.transformer.n_head=2", "model.transformer.patch_size=7", "data.max_train_samples=48",
        "data.max_test_samples=16", f"train.num_clients={CLIENTS}", "train.batch_size=8", "stop.rounds=1",
        "algorithm.name=cse_fsl", "algorithm.aux.kind=linear", "model.lora.r=8",
        "model.lora.target_modules=[q_proj, v_proj]", "cluster.backend=local", "output.progress=false",
        f"output.dir={tmp_path}"])
    device, _, aux = fresh_modules(cfg)
    assert set(trainable(aux)) == {"classifier.weight", "classifier.bias"}
    assert frozen(aux) == {"layernorm.weight", "layernorm.bias"}
    for m in (device, aux):
        assert_sends_exactly_trainable(m)
    coord, _ = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    kinds = coord.run_one_round(1)["bytes_by_kind"]
    aux_bytes, dev_bytes = sum(trainable(aux).values()), sum(trainable(device).values())
    assert kinds["down/aux_weights"] == kinds["up/aux_weights"] == CLIENTS * aux_bytes == CLIENTS * 4 * (32 * 10 + 10)
    assert kinds["down/weights"] == kinds["up/weights"] == CLIENTS * dev_bytes


# A target only the second block of a 2-block device (and server) has: the blocks match, a 1-block aux does not.
NOTHING_TO_TRAIN = ["model.cut=block2", "model.transformer.n_layer=4", "model.lora.target_modules=[h.1.attn.c_attn]",
                    "algorithm.aux.kind=blocks", "algorithm.aux.blocks=1"]


def test_an_aux_with_nothing_to_train_is_refused_at_prepare(tmp_path):
    cfg = load_config(None, GPT2 + ALGO["cse_fsl"] + NOTHING_TO_TRAIN + [f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="nothing in this aux trains") as err:
        prepare(cfg)
    assert err.value.key == "algorithm.aux"
    assert "aux.kind=linear" in str(err.value)
    # The same targets with a linear aux are fine: its head adapter trains.
    ok = load_config(None, GPT2 + ALGO["cse_fsl"] + NOTHING_TO_TRAIN + ["algorithm.aux.kind=linear",
                                                                          f"output.dir={tmp_path}"])
    assert set(trainable(fresh_modules(ok)[2])) == AUX_TRAINABLE["linear"]


def test_the_cli_refuses_it_before_any_run_starts(tmp_path, capsys):
    args = [f"--set={s}" for s in GPT2 + ALGO["fsl_sage"] + NOTHING_TO_TRAIN + [f"output.dir={tmp_path}",
                                                                               "output.name=refused"]]
    job = tmp_path / "job.yaml"
    job.write_text("seed: 0\n")
    assert main(["--config", str(job)] + args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("config error: algorithm.aux=")
    assert not (tmp_path / "refused").exists()  # nothing was written, nothing started


def test_vit_server_classifier_trains_under_lora():
    """The task head is new (random init): under LoRA it must train whole, not stay frozen."""
    from sfl_ray.config import ModelConfig
    from sfl_ray.models.split import build_parts
    from sfl_ray.runtime.wire import module_weights

    cfg = ModelConfig(name="vit", cut="block1", transformer={"n_layer": 2, "n_embd": 16, "n_head": 2},
                      lora={"r": 2, "target_modules": ["query", "value", "q_proj", "v_proj"]})
    parts = build_parts("vit", "block1", (3, 16, 16), 10, 0, cfg)
    trainable = {n for n, p in parts.server.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert {"classifier.weight", "classifier.bias"} <= set(module_weights(parts.server))
    assert not any("layernorm" in n for n in trainable)
