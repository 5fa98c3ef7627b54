"""The papers' LLM setting in miniature: LoRA fine-tuning of a pretrained GPT-2 on E2E, split
after block k, under SplitFed v2, CSE-FSL, FSL-SAGE and HERON-SFL at equal rounds.

    python bench/gpt2_lora_compare.py --e2e FOLDER [--pretrain-steps 300] [--rounds 3]

No pretrained GPT-2 weights are available offline, so step 1 pretrains a tiny GPT-2 (the
`jobs/gpt2_e2e_tiny.yaml` shape, real GPT-2 tokenizer) centrally as a plain language model on
the reference sentences alone of E2E training rows the fine-tuning slice does not use, and
saves it with `save_pretrained`: it knows the language but not the "mr || ref" task, as GPT-2
knows English but not E2E. Step 2 runs `python -m sfl_ray.compare` on the shipped slice with
`model.transformer.pretrained=<that folder>` and LoRA on `c_attn`; each algorithm's aux (if it
has one) is one transformer block + norm + LM head copied from the server (HERON-SFL's choice),
the same for all three aux methods. Prints the compare table (first/final perplexity, GiB moved,
device peak memory) and writes it to `<out>/compare.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from sfl_ray.config import load_config
from sfl_ray.data.sources import load_source
from sfl_ray.data.text import e2e_splits, load_tokenizer
from sfl_ray.metrics.evaluate import Evaluator
from sfl_ray.models.task import task_loss
from sfl_ray.runtime.launch import make_blueprint
from sfl_ray.runtime.wire import module_weights

TINY = load_config("jobs/gpt2_e2e_tiny.yaml", []).model.transformer


def reference_lm_data(e2e: str, rows: tuple[int, int], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """E2E reference sentences (no meaning representations) as padded LM examples."""
    ds = e2e_splits(e2e)["train"].select(range(*rows))
    tok = load_tokenizer(None)
    ids, labels = [], []
    for t in tok(list(ds["ref"]), add_special_tokens=False)["input_ids"]:
        t = (t + [tok.eos_token_id])[:max_length]
        pad = max_length - len(t)
        ids.append(t + [tok.eos_token_id] * pad)
        labels.append(t + [-100] * pad)
    return torch.tensor(ids), torch.tensor(labels)


def pretrain(e2e: str, rows: tuple[int, int], steps: int, out: Path, seed: int = 0) -> Path:
    """Pretrain the tiny GPT-2 on the references of E2E training rows [rows[0], rows[1]); save it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    x, y = reference_lm_data(e2e, rows)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(load_tokenizer(None)), n_positions=TINY.n_positions,
                                       n_embd=TINY.n_embd, n_layer=TINY.n_layer, n_head=TINY.n_head))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen, t0 = torch.Generator().manual_seed(seed), time.time()
    for step in range(1, steps + 1):
        b = torch.randint(0, len(x), (32,), generator=gen)
        loss = task_loss(model(x[b]).logits, y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            print(f"pretrain step {step}/{steps} | loss {loss.item():.3f} | ppl {math.exp(loss.item()):.1f} "
                  f"| {time.time() - t0:.0f}s", flush=True)
    model.save_pretrained(out)
    return out


def start_perplexity(ckpt: Path) -> float:
    """Validation perplexity of the pretrained model before fine-tuning (the curves' round 0),
    measured by the runs' own evaluator on the same split model."""
    cfg = load_config("jobs/gpt2_e2e_tiny.yaml", [f"model.transformer.pretrained={ckpt.resolve()}"])
    data = load_source(cfg.data)
    parts = make_blueprint(cfg, data).build_parts()
    evaluator = Evaluator(parts, data.test_x, data.test_y, cfg.train.eval_batch_size, cfg.train.precision)
    return evaluator.evaluate(module_weights(parts.device), module_weights(parts.server))["eval_perplexity"]


def curves(out: Path, algorithms: list[str]) -> str:
    """Per-round eval perplexity of each algorithm, from its metrics.jsonl."""
    lines = []
    for a in algorithms:
        rows = [json.loads(line) for line in (out / a / "metrics.jsonl").read_text().splitlines()]
        ppl = " -> ".join(f"{r['eval_perplexity']:.1f}" for r in rows if r.get("eval_perplexity") is not None)
        lines.append(f"{a}: {ppl}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--e2e", required=True, help="a folder of the E2E csv release (trainset.csv, devset.csv)")
    ap.add_argument("--pretrain-rows", default="8000:20000", help="E2E training rows to pretrain on")
    ap.add_argument("--pretrain-steps", type=int, default=250)
    ap.add_argument("--lr", type=float, default=0.005, help="fine-tuning (LoRA) learning rate")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="runs/gpt2_lora_compare")
    args = ap.parse_args()
    out = Path(args.out)
    lo, hi = (int(v) for v in args.pretrain_rows.split(":"))
    ckpt = out / "pretrained"
    if not (ckpt / "config.json").exists():
        pretrain(args.e2e, (lo, hi), args.pretrain_steps, ckpt)

    from sfl_ray.compare import main as compare
    aux = ["algorithm.aux.kind=blocks", "algorithm.aux.blocks=1", "algorithm.aux.init_from_server=true"]
    algorithms = ["splitfed_v2", "cse_fsl", "fsl_sage", "heron_sfl"]
    code = compare(["--config", "jobs/gpt2_e2e_tiny.yaml", "--algorithms", ",".join(algorithms),
                    "--set", f"model.transformer.pretrained={ckpt.resolve()}", "--set", "model.lora.r=8",
                    "--set", "model.lora.alpha=16", "--set", "model.lora.target_modules=[c_attn]",
                    "--set", f"train.lr={args.lr}", "--set", f"stop.rounds={args.rounds}",
                    "--set", "cluster.backend=local", "--set", f"output.dir={out.parent}",
                    "--set", f"output.name={out.name}", "--set", "output.progress=false",
                    *(f"--algo-set={a}:{o}" for a in ("cse_fsl", "fsl_sage", "heron_sfl") for o in aux),
                    "--algo-set=fsl_sage:algorithm.align_epochs=5", "--algo-set=fsl_sage:algorithm.buffer_size=64",
                    "--algo-set=fsl_sage:algorithm.align_every=2"])
    print((out / "compare.md").read_text())
    print(f"pretrained, before fine-tuning: eval perplexity {start_perplexity(ckpt):.1f}")
    print(curves(out, algorithms))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
