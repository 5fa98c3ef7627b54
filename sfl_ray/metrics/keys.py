"""The numeric keys of a metrics.jsonl row: what `stop.target_metric.name` may name.

Kept beside the code that makes them: the coordinator's accounting
(`sfl_ray/runtime/coordinator.py` `_account`), the evaluator (`sfl_ray/metrics/evaluate.py`)
and the algorithms' own `RoundSummary.extra` keys. A test checks a real row against this list.
"""

from __future__ import annotations

EVAL_METRICS = ("eval_accuracy", "eval_loss", "eval_perplexity")
RUNTIME_METRICS = ("round", "clients", "train_loss", "bytes_up", "bytes_down", "bytes_cum", "device_flops",
                   "device_peak_mem_bytes", "device_cuda_peak_mem_bytes", "server_flops", "sim_s", "sim_cum_s",
                   "wall_s", "faults", "mem_clients")
ALGORITHM_METRICS = ("server_loss", "server_steps", "server_samples", "align_cosine", "align_cosine_before",
                     "align_mse", "align_mse_before", "aligned_clients", "phi", "server_lr", "iterations",
                     "server_gradient_send_bytes", "server_replicas", "consolidated_samples",
                     "server_batch_devices_mean")
ROW_METRICS = EVAL_METRICS + RUNTIME_METRICS + ALGORITHM_METRICS
