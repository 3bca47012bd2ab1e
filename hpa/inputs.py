"""The model's input: from a loader's batch to the tensor the network sees.

Every data source (PNG layout, packed shards) yields the same thing per image, and training, validation and
prediction all finish it here, on the device, with `prepare`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """R,G,B,Y float batch -> the classic 3-channel mapping G, (R+Y)/2, (B+Y)/2."""
    r, g, b, y = x.unbind(1)
    return torch.stack([g, (r + y) / 2, (b + y) / 2], dim=1)


def prepare(x: torch.Tensor, in_chans: int, size: int) -> torch.Tensor:
    """Loader batch (uint8 0..255 or float 0..1, any size, 4 or `in_chans` channels) -> float [0, 1] of
    `in_chans` channels at `size` x `size`."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if x.shape[1] == 4 and in_chans == 3:
        x = to_rgb(x)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x
