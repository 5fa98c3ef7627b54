"""Link compression's effect on accuracy at equal rounds: the quickstart job (built-in MNIST, cnn,
SplitFed v2, 20 Dirichlet(0.5) clients, 10 a round) once per link.compression mode, local backend.

    python bench/compression.py [--rounds 10] [--modes none,fp16,bf16,int8/tensor,int8/channel]

Prints one line per mode (final and best test accuracy, final train loss, bytes up and down, the
activation + gradient bytes relative to no compression, wall time), then, as its last line, one
JSON object: {"bench": "compression", "modes", "accuracy", "bytes_up", "bytes_down", "rounds"}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sfl_ray.config import load_config
from sfl_ray.run import prepare
from sfl_ray.runtime.launch import run_experiment

JOB = Path(__file__).resolve().parent.parent / "jobs" / "quickstart.yaml"
MIB = 1024 ** 2


def run_mode(mode: str, rounds: int, out: str) -> dict:
    """One run with link.compression `mode` ('int8/tensor' picks the int8 scale); its totals."""
    compression, _, scale = mode.partition("/")
    cfg = load_config(str(JOB), [
        "cluster.backend=local", f"stop.rounds={rounds}", "stop.target_metric=null",
        f"link.compression={compression}", f"link.int8_scale={scale or 'channel'}",
        f"output.dir={out}", f"output.name={mode.replace('/', '-')}", "output.progress=false",
        "output.checkpoint_every=0"])
    algorithm_cls, data, shards, _ = prepare(cfg)
    t0 = time.perf_counter()
    summary = run_experiment(algorithm_cls, cfg, data, shards)
    with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    tensors = sum(v for r in rows for k, v in r["bytes_by_kind"].items()
                  if k in ("up/activations", "down/gradients"))
    return {"accuracy": rows[-1]["eval_accuracy"], "best": summary["best_eval_accuracy"],
            "loss": rows[-1]["train_loss"], "bytes_up": sum(r["bytes_up"] for r in rows),
            "bytes_down": sum(r["bytes_down"] for r in rows), "tensor_bytes": tensors,
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--modes", default="none,fp16,bf16,int8/tensor,int8/channel")
    args = ap.parse_args()
    modes = args.modes.split(",")
    out = tempfile.mkdtemp(prefix="sfl_bench_compression")
    print(f"quickstart (MNIST, cnn, splitfed_v2), {args.rounds} rounds per mode, local backend")
    print(f"{'mode':<13} {'final acc':>9} {'best acc':>8} {'loss':>7} {'up MiB':>8} {'down MiB':>8} "
          f"{'act+grad':>8} {'wall s':>7}")
    res = {}
    for mode in modes:
        r = res[mode] = run_mode(mode, args.rounds, out)
        ref = res[modes[0]]["tensor_bytes"]
        print(f"{mode:<13} {r['accuracy']:>9.4f} {r['best']:>8.4f} {r['loss']:>7.4f} {r['bytes_up'] / MIB:>8.1f} "
              f"{r['bytes_down'] / MIB:>8.1f} {r['tensor_bytes'] / ref:>8.3f} {r['wall_s']:>7.1f}", flush=True)
    print(f"(act+grad: activation and gradient bytes relative to {modes[0]})")
    print(json.dumps({"bench": "compression", "modes": modes, "accuracy": [res[m]["accuracy"] for m in modes],
                      "bytes_up": [res[m]["bytes_up"] for m in modes],
                      "bytes_down": [res[m]["bytes_down"] for m in modes], "rounds": args.rounds}))


if __name__ == "__main__":
    main()
