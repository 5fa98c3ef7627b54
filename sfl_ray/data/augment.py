"""Training-batch augmentation on the device, in torch ops (torchvision is not a dependency).

`crop_flip` is CIFAR's standard RandomCrop(size, padding=4) + RandomHorizontalFlip(0.5), drawn
per sample from a generator the caller derives from (seed, round, client, epoch, batch), so the
same batch is augmented the same way in every process and on every backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTS = ("none", "crop_flip")
CROP_PADDING = 4


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """The augmented batch (a new tensor); `none` returns `x` itself."""
    if kind == "none":
        return x
    if kind != "crop_flip":
        raise ValueError(f"unknown augmentation {kind!r}; allowed: {', '.join(AUGMENTS)}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"crop_flip needs float images (B, C, H, W), got {tuple(x.shape)} {x.dtype}")
    b, _, h, w = x.shape
    p = CROP_PADDING
    # Draws on the CPU generator, then index: the numbers do not depend on where x lives.
    top = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    left = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(0), cols)            # crop then mirror: column left + W-1-j
    rows = (top[:, None] + torch.arange(h)).to(x.device)               # (B, H) in the padded image
    cols = (left[:, None] + cols).to(x.device)                         # (B, W)
    padded = F.pad(x, (p, p, p, p))                                    # zeros around every image
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice put the channel last: (B, H, W, C).
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
