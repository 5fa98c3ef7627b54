"""Evaluating the global model (device block then server block) on the held-out test split."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sfl_ray.models.split import ModelParts
from sfl_ray.runtime.wire import load_weights


class Evaluator:
    """Holds the test arrays and one copy of the models to load global weights into."""

    def __init__(self, parts: ModelParts, test_x: np.ndarray, test_y: np.ndarray, batch_size: int):
        self.parts, self.x, self.y, self.batch_size = parts, test_x, test_y, batch_size

    @torch.no_grad()
    def evaluate(self, device_weights: dict, server_weights: dict) -> dict:
        load_weights(self.parts.device, device_weights)
        load_weights(self.parts.server, server_weights)
        model = self.parts.full().eval()
        correct, loss = 0, 0.0
        for i in range(0, len(self.y), self.batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(self.x[i: i + self.batch_size]))
            yb = torch.from_numpy(np.ascontiguousarray(self.y[i: i + self.batch_size]))
            logits = model(xb)
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        n = len(self.y)
        return {"eval_accuracy": correct / n, "eval_loss": loss / n}
