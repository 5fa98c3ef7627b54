"""The training loss of a task, chosen by the shape of the logits.

(B, C) logits: classification, cross-entropy. (B, T, V) logits: causal language modelling,
token t predicts token t + 1 and labels of -100 (prompt, padding) take no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def task_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for classification or next-token prediction.

    reduction: "mean" (over samples, or over target tokens for LM), "sum", or "none" (one loss
    per sample; for LM the mean over that sample's target tokens).
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels, reduction=reduction)
    logits, labels = logits[:, :-1], labels[:, 1:]
    if reduction in ("sum", "mean"):
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=IGNORE, reduction="sum")
        # The mean is divided here: a batch whose prompts fill data.max_length has no target, and
        # cross_entropy's own mean is then 0/0 (a NaN loss and NaN gradients); this one is 0.
        return total if reduction == "sum" else total / (labels != IGNORE).sum().clamp(min=1)
    if reduction != "none":
        raise ValueError(f"reduction {reduction!r}: one of mean, sum, none")
    tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # (B, T-1)
    return tok.sum(1) / (labels != IGNORE).sum(1).clamp(min=1)


def target_count(labels: torch.Tensor) -> int:
    """How many targets a batch has: samples for classification, target tokens for LM."""
    if labels.dim() == 1:
        return int(labels.numel())
    return int((labels[:, 1:] != IGNORE).sum())
