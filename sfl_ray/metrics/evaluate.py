"""Evaluating the global model (device block then server block) on the held-out test split."""

from __future__ import annotations

import math

import numpy as np
import torch

from sfl_ray.models.split import ModelParts
from sfl_ray.models.task import target_count, task_loss
from sfl_ray.runtime.precision import autocast
from sfl_ray.runtime.wire import load_weights, to_tensor


class Evaluator:
    """Holds the test arrays and one copy of the models to load global weights into. It runs
    where the coordinator runs, on a CPU (no host-device copies), under train.precision."""

    def __init__(self, parts: ModelParts, test_x: np.ndarray, test_y: np.ndarray, batch_size: int,
                 precision: str = "fp32"):
        self.parts, self.x, self.y, self.batch_size = parts, test_x, test_y, batch_size
        self.precision = precision

    @torch.no_grad()
    def evaluate(self, device_weights: dict, server_weights: dict) -> dict:
        """Classification: accuracy and mean loss. Language models: mean loss per target token
        and its exponential, the perplexity."""
        load_weights(self.parts.device, device_weights)
        load_weights(self.parts.server, server_weights)
        model = self.parts.full().eval()
        correct, loss, count = 0, 0.0, 0
        for i in range(0, len(self.y), self.batch_size):
            xb = to_tensor(np.ascontiguousarray(self.x[i: i + self.batch_size]))
            yb = to_tensor(np.ascontiguousarray(self.y[i: i + self.batch_size]))
            with autocast(self.precision, "cpu"):  # the model as it was trained
                logits = model(xb)
                loss += float(task_loss(logits, yb, reduction="sum"))
            count += target_count(yb)
            if logits.dim() == 2:
                correct += int((logits.argmax(1) == yb).sum())
        if self.y.ndim == 1:
            return {"eval_accuracy": correct / len(self.y), "eval_loss": loss / count}
        return {"eval_perplexity": math.exp(min(loss / count, 50.0)), "eval_loss": loss / count}
