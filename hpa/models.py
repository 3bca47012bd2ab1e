"""Model factory: ImageNet-style CNNs with a 4-channel (R, G, B, Y) input and a 28-way multi-label head.

`create_model(name, in_chans=4)` returns an `HPAModel`: the backbone plus the input normalisation, so a
checkpoint carries everything `predict` needs (it feeds [0, 1] floats or uint8 and gets logits back).
Weights never come from the network (there is none at run time): `weights=` is a LOCAL state-dict file
of the 3-channel model, adapted to 4 inputs by `adapt_first_conv`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from hpa.errors import ConfigError
from hpa.labels import NUM_CLASSES

log = logging.getLogger(__name__)

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "se_resnet18", "se_resnet50", "densenet121")

# Per-channel statistics of the real HPA train images, R G B Y in [0, 1] (widely used in the Kaggle
# competition). The 3-channel `rgb` mode maps to G, (R+Y)/2, (B+Y)/2, hence its values.
HPA_MEAN = {"rgby": (0.0804, 0.0526, 0.0548, 0.0827), "rgb": (0.0526, 0.0816, 0.0688)}
HPA_STD = {"rgby": (0.1496, 0.1122, 0.1560, 0.1497), "rgb": (0.1122, 0.1350, 0.1400)}


@dataclass(frozen=True)
class _Arch:
    build: Callable[[], nn.Module]  # 3-channel, ImageNet-shaped, random init, never downloads
    first_conv: str                 # attribute path of the stem convolution
    head: str                       # attribute path of the final Linear


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm  # imported lazily: it is slow to import and only the SE models need it

        # pretrained=False always: True tries the network and hangs ~45 s with no internet.
        return timm.create_model(name, pretrained=False)
    return build


ARCHS: dict[str, _Arch] = {
    "resnet18": _Arch(lambda: torchvision.models.resnet18(weights=None), "conv1", "fc"),
    "resnet34": _Arch(lambda: torchvision.models.resnet34(weights=None), "conv1", "fc"),
    "resnet50": _Arch(lambda: torchvision.models.resnet50(weights=None), "conv1", "fc"),
    "se_resnet18": _Arch(_timm("seresnet18"), "conv1", "fc"),
    "se_resnet50": _Arch(_timm("seresnet50"), "conv1", "fc"),
    "densenet121": _Arch(lambda: torchvision.models.densenet121(weights=None), "features.conv0", "classifier"),
}


class DropoutLinear(nn.Linear):
    """The classifier head with dropout on its input; a Linear subclass so state-dict keys stay
    `fc.weight`/`fc.bias` whatever the dropout rate."""

    def __init__(self, in_features: int, out_features: int, drop_rate: float = 0.0):
        super().__init__(in_features, out_features)
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.drop(x))


class HPAModel(nn.Module):
    """Backbone + input normalisation. Accepts uint8 (0..255) or float ([0, 1]) images, returns logits."""

    def __init__(self, backbone: nn.Module, arch: str, in_chans: int, num_classes: int, drop_rate: float):
        super().__init__()
        mode = "rgby" if in_chans == 4 else "rgb"
        self.arch, self.in_chans, self.num_classes, self.drop_rate = arch, in_chans, num_classes, drop_rate
        self.backbone = backbone
        # Buffers, so they travel with the state dict and move with .to(device).
        self.register_buffer("mean", torch.tensor(HPA_MEAN[mode]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(HPA_STD[mode]).view(1, -1, 1, 1))

    def first_conv(self) -> nn.Conv2d:
        return _get(self.backbone, ARCHS[self.arch].first_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        return self.backbone((x - self.mean) / self.std)


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """3-channel stem filters (O, 3, k, k) -> (O, in_chans, k, k).

    The R, G, B filters are kept bit-identical and the yellow filter is their mean. We deliberately do
    NOT rescale: every supported architecture puts a BatchNorm right after the stem conv, which
    normalises the activation scale in training (batch statistics) and re-learns its running stats,
    so a 4/3 rescale would buy nothing, while identical RGB filters mean an image with an empty yellow
    channel gets exactly the pretrained response.
    """
    if weight.shape[1] != 3:
        raise ConfigError(f"weights: stem conv has {weight.shape[1]} input channels, expected a 3-channel model")
    if in_chans == 3:
        return weight.clone()
    return torch.cat([weight, weight.mean(dim=1, keepdim=True)], dim=1)


def _new_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # as torchvision/timm do
    return new


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"weights: file {path} does not exist (weights must be a local state-dict file)") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad weights file
        raise ConfigError(f"weights: {path} is not a loadable state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"weights: {path} does not hold a state dict")
    # Old torchvision densenet files name `norm.1` what modules now call `norm1`.
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    return {pattern.sub(r"\1\2", k).removeprefix("module."): v for k, v in state.items()}


def _load_3ch_weights(backbone: nn.Module, arch: str, path: str | Path) -> None:
    """Load a 3-channel state dict into the (still 3-channel) backbone; the head is ignored because it
    is replaced afterwards."""
    state = _read_state_dict(path)
    head = ARCHS[arch].head + "."
    own = backbone.state_dict()
    missing = [k for k in own if not k.startswith(head) and k not in state]
    unexpected = [k for k in state if not k.startswith(head) and k not in own]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ConfigError(f"weights: {path} does not match {arch}: {len(missing)} missing and "
                          f"{len(unexpected)} unexpected keys, e.g. {example!r}")
    for key, value in own.items():
        if not key.startswith(head) and state[key].shape != value.shape:
            raise ConfigError(f"weights: {path} key {key!r} has shape {tuple(state[key].shape)}, {arch} expects {tuple(value.shape)}")
    backbone.load_state_dict({k: v for k, v in state.items() if k in own and not k.startswith(head)}, strict=False)


def create_model(name: str, in_chans: int = 4, num_classes: int = NUM_CLASSES, weights: str | Path | None = None,
                 drop_rate: float = 0.0) -> HPAModel:
    """Build `name` for `in_chans` (4 = R,G,B,Y; 3 = the classic RGB mapping) and `num_classes` outputs.

    `weights`: optional local state dict of the 3-channel ImageNet-shaped model (any head size).
    """
    if name not in ARCHS:
        raise ConfigError(f"arch: unknown model {name!r}, expected one of {', '.join(MODEL_NAMES)}")
    if in_chans not in (3, 4):
        raise ConfigError(f"in_chans: {in_chans} is not supported, expected 3 (rgb) or 4 (rgby)")
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate: {drop_rate} is outside [0, 1)")
    spec = ARCHS[name]
    backbone = spec.build()
    if weights is not None:
        _load_3ch_weights(backbone, name, weights)
    stem = _get(backbone, spec.first_conv)
    if in_chans != 3:
        conv = _new_conv(stem, in_chans)
        if weights is not None:
            with torch.no_grad():
                conv.weight.copy_(adapt_first_conv(stem.weight, in_chans))
                if stem.bias is not None:
                    conv.bias.copy_(stem.bias)
        _set(backbone, spec.first_conv, conv)
    old_head = _get(backbone, spec.head)
    _set(backbone, spec.head, DropoutLinear(old_head.in_features, num_classes, drop_rate))
    return HPAModel(backbone, name, in_chans, num_classes, drop_rate)


def load_checkpoint(path_or_uri: str | Path, map_location: str | torch.device = "cpu") -> tuple[HPAModel, dict]:
    """Load a training checkpoint (`last.pt`/`best.pt`, local path or s3:// URI) into a fresh model in
    eval mode. Returns (model, meta) where meta is the checkpoint without the tensors of model,
    optimizer and scheduler state (arch, in_chans, num_classes, color_mode, size, epoch, config, ...)."""
    path = str(path_or_uri)
    if path.startswith("s3://"):
        import tempfile

        from hpa import store

        with tempfile.TemporaryDirectory() as tmp:
            local = str(Path(tmp) / "checkpoint.pt")
            store.fetch(path, local)
            ckpt = _torch_load(local, map_location)
    else:
        ckpt = _torch_load(path, map_location)
    for key in ("model", "arch", "in_chans", "num_classes"):
        if key not in ckpt:
            raise ConfigError(f"checkpoint {path}: missing key {key!r} (not an hpa training checkpoint)")
    drop_rate = float(ckpt.get("config", {}).get("drop_rate", 0.0))
    model = create_model(ckpt["arch"], ckpt["in_chans"], ckpt["num_classes"], drop_rate=drop_rate)
    model.load_state_dict(ckpt["model"])
    model.to(map_location).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng", "rank_loss")}
    return model, meta


def _torch_load(path: str, map_location) -> dict:
    try:
        # weights_only=True: a checkpoint is data, never code (issue 8, security).
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"checkpoint {path} is not loadable ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"checkpoint {path} does not hold a dict")
    return ckpt
