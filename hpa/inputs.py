"""The model's input: one path from a stored image to the tensor the network sees, for every source and stage.

    stored bytes --decode--> uint8 planes --resize_image--> uint8 (4, size, size) R,G,B,Y --prepare--> model tensor
                                                            (what every source yields)    (on the device)

- Decode: a PNG/JPEG channel file is decoded by `hpa.data.decode_channel` (its pixel rules), a packed-shard
  payload by `hpa.shards.decode_image`; no reader decodes any other way.
- Every data source yields per image the same raw thing: a uint8 (4, size, size) array/tensor of R,G,B,Y planes
  (0..255) at the REQUESTED size (the model's `size`), resized by `resize_image` when the stored size differs:
  `hpa.data.PNGDataset`/`load_image` (the PNG layout, local or through a dataset view), `hpa.shards.ShardDataset`
  (a shard set packed at another size is resized per sample) and `hpa.pack` (which stores `load_image(size=)`).
  So an image read from the PNG layout and from shards packed at its stored or at the requested size holds the
  same bytes.
- `prepare` finishes a batch on the device: float [0, 1] (x / 255), then the colour mode (`to_rgb` for "rgb": the
  float mapping, no rounding). Training (train and validation batches), `hpa.predict` and `hpa.data.HPADataset`
  all call it; a batch at another size than the model's is an error, not a silent second resize.
- Dihedral transforms (`dihedral`, TTA order `TTA_NAMES`) for test-time augmentation and `RandomDihedral`.

torch is imported where it is used: reading and resizing stored images (download validation, montage) stays
torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from hpa.errors import DataError

if TYPE_CHECKING:
    import torch

CHANNELS = {"rgby": 4, "rgb": 3}        # colour mode -> the model's input channels
COLOR_MODES = tuple(CHANNELS)
TTA_NAMES = ("identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "antitranspose")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) plane or (C, H, W) planes -> size x size (bilinear, antialiased when shrinking); unchanged
    when already that size. The one resize of stored pixels: readers, pack and the HPA v18 download use it."""
    if image.shape[-2:] == (size, size):
        return image
    if image.ndim == 3:
        return np.stack([resize_image(plane, size) for plane in image])
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def to_rgb(x):
    """R,G,B,Y on axis -3 ((4, H, W) or (N, 4, H, W)) -> the classic 3-channel mapping G, (R+Y)/2, (B+Y)/2.

    Float in, float out, exact: the model's input (`prepare` converts to float first). uint8 in, uint8 out with
    halves rounded up: for pictures of an image (`hpa.data.load_image(color_mode="rgb")`), never for the model.
    A numpy array in gives a numpy array out.
    """
    import torch

    t = torch.as_tensor(x)
    if t.dtype == torch.uint8:
        r, g, b, y = t.to(torch.int16).unbind(-3)
        out = torch.stack([g, (r + y + 1) // 2, (b + y + 1) // 2], dim=-3).to(torch.uint8)
    else:
        r, g, b, y = t.unbind(-3)
        out = torch.stack([g, (r + y) / 2, (b + y) / 2], dim=-3)
    return out.numpy() if isinstance(x, np.ndarray) else out


def prepare(x: torch.Tensor, in_chans: int, size: int | None = None) -> torch.Tensor:
    """A loader batch (N, 4 or `in_chans`, H, W), uint8 0..255 as the sources yield it (or float 0..1) -> float
    [0, 1] with `in_chans` channels (4: R,G,B,Y; 3: `to_rgb`). `size`: the model's input size, which the batch
    must have (sources read at the requested size); None accepts any."""
    import torch

    if size is not None and tuple(x.shape[-2:]) != (size, size):
        raise DataError(f"input batch is {x.shape[-1]}x{x.shape[-2]} pixels, the model takes {size}x{size}: "
                        "read the images at the model's size")
    if x.shape[-3] not in (4, in_chans):
        raise DataError(f"input batch has {x.shape[-3]} channels, expected 4 (R,G,B,Y) or {in_chans}")
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if x.shape[-3] == 4 and in_chans == 3:
        x = to_rgb(x)
    return x


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7, `TTA_NAMES` order) of the 8 flips/rotations of a (..., H, W) tensor; k = 0 is the identity."""
    h, w = -2, -1
    return [
        lambda t: t,
        lambda t: t.flip(w),
        lambda t: t.flip(h),
        lambda t: t.flip(h, w),
        lambda t: t.rot90(1, (h, w)),
        lambda t: t.rot90(3, (h, w)),
        lambda t: t.transpose(h, w),
        lambda t: t.transpose(h, w).flip(h, w),
    ][k](x)


class RandomDihedral:
    """Augmentation for `hpa.data.HPADataset`'s transform hook: a random one of the 8 dihedral transforms
    (microscopy has no preferred orientation)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return dihedral(x, int(torch.randint(0, 8, (1,), generator=self.generator)))
