"""Model factory: ImageNet-style CNNs with a 4-channel (R, G, B, Y) input and a 28-way multi-label head.

`create_model(name, in_chans=4)` returns an `HPAModel`: the backbone plus the input normalisation, so a
checkpoint carries everything `predict` needs (it feeds [0, 1] floats or uint8 and gets logits back).

`weights=` starts the backbone from a 3-channel ImageNet-shaped state dict (imagenet, a local file or an
s3:// URI, read by hpa.weights), adapted to 4 inputs by `adapt_first_conv`.

Checkpoints: `load_checkpoint` (a training checkpoint, local or s3://, into a fresh model in eval mode),
`read_checkpoint`, `model_for_checkpoint` and `load_model_state`, each failing with one ConfigError line.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from hpa.errors import ConfigError, first_line
from hpa.labels import NUM_CLASSES
from hpa.weights import read_weights, weights_source

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


def _check_matches(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], arch: str, head: str,
                   source: str) -> None:
    """One clear line naming the file and a few keys when `state` is not a (3-channel) `arch` backbone."""
    missing = [k for k in own if not k.startswith(head) and k not in state]
    unexpected = [k for k in state if not k.startswith(head) and k not in own]
    if missing or unexpected:
        raise ConfigError(f"weights: {source} does not match {arch}: {len(missing)} missing keys "
                          f"{missing[:3]} and {len(unexpected)} unexpected keys {unexpected[:3]}")
    wrong = [k for k in own if not k.startswith(head) and state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"weights: {source} does not match {arch}: {len(wrong)} keys of another shape, e.g. "
                          f"{k!r} is {tuple(state[k].shape)}, {arch} expects {tuple(own[k].shape)}")


def create_model(name: str, in_chans: int = 4, num_classes: int = NUM_CLASSES, weights: str | Path | None = None,
                 drop_rate: float = 0.0) -> HPAModel:
    """Build `name` for `in_chans` (4 = R,G,B,Y; 3 = the classic RGB mapping) and `num_classes` outputs.

    `weights`: None or "" = random init; "imagenet", a local file or an s3:// URI = a 3-channel
    ImageNet-shaped state dict of the same architecture (any head size; the head is loaded only when
    its shape is already (num_classes, features), else re-initialised).
    """
    if name not in ARCHS:
        raise ConfigError(f"arch: unknown model {name!r}, expected one of {', '.join(MODEL_NAMES)}")
    if in_chans not in (3, 4):
        raise ConfigError(f"in_chans: {in_chans} is not supported, expected 3 (rgb) or 4 (rgby)")
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate: {drop_rate} is outside [0, 1)")
    spec = ARCHS[name]
    backbone = spec.build()
    source = weights_source(weights)
    state = read_weights(weights, name) if source else None
    head = spec.head + "."
    if state is not None:
        own = backbone.state_dict()
        _check_matches(own, state, name, head, source)
        body = {k: v for k, v in state.items() if not k.startswith(head)}
        backbone.load_state_dict(body, strict=False)  # still 3-channel: the stem is adapted below
    stem = _get(backbone, spec.first_conv)
    if in_chans != 3:
        conv = _new_conv(stem, in_chans)
        if state is not None:
            with torch.no_grad():
                conv.weight.copy_(adapt_first_conv(stem.weight, in_chans))
                if stem.bias is not None:
                    conv.bias.copy_(stem.bias)
        _set(backbone, spec.first_conv, conv)
    old_head = _get(backbone, spec.head)
    new_head = DropoutLinear(old_head.in_features, num_classes, drop_rate)
    file_head = {k: state.get(head + k) for k in new_head.state_dict()} if state is not None else {}
    head_loaded = bool(file_head) and all(v is not None and v.shape == new_head.state_dict()[k].shape
                                          for k, v in file_head.items())
    if head_loaded:  # e.g. a 28-class file: keep its head too
        new_head.load_state_dict(file_head)
    _set(backbone, spec.head, new_head)
    if state is not None:
        _log_weights(name, source, body, spec.first_conv + ".weight", in_chans, state, head, head_loaded, num_classes)
    return HPAModel(backbone, name, in_chans, num_classes, drop_rate)


def _log_weights(arch: str, source: str, body: dict, stem_key: str, in_chans: int, state: dict, head: str,
                 head_loaded: bool, num_classes: int) -> None:
    adapted = [stem_key] if in_chans != 3 else []
    head_keys = sorted(k for k in state if k.startswith(head))
    loaded = len(body) - len(adapted) + (len(head_keys) if head_loaded else 0)
    skipped = "none" if head_loaded or not head_keys else (
        f"{', '.join(f'{k}{tuple(state[k].shape)}' for k in head_keys)} "
        f"(head re-initialised for {num_classes} classes)")
    log.info("weights: %s from %s: loaded %d tensors, adapted %s, skipped %s", arch, source, loaded,
             f"{stem_key} (3 -> {in_chans} channels: RGB kept, yellow = mean of RGB)" if adapted else "none", skipped)


# Keys every hpa checkpoint (last.pt, best.pt) has; resuming needs more (hpa.train.RESUME_KEYS).
CHECKPOINT_KEYS = ("model", "arch", "in_chans", "num_classes")


def load_checkpoint(path_or_uri: str | Path, map_location: str | torch.device = "cpu") -> tuple[HPAModel, dict]:
    """Load a training checkpoint (`last.pt`/`best.pt`, local path or s3:// URI) into a fresh model in
    eval mode. Returns (model, meta) where meta is the checkpoint without the tensors of model,
    optimizer and scheduler state (arch, in_chans, num_classes, color_mode, size, epoch, config, ...).
    Any problem with the file is one ConfigError line naming it."""
    path = str(path_or_uri)
    if path.startswith("s3://"):
        from hpa import store

        with tempfile.TemporaryDirectory() as tmp:
            local = str(Path(tmp) / "checkpoint.pt")
            store.fetch(path, local)
            ckpt = read_checkpoint(local, map_location, name=path)
    else:
        ckpt = read_checkpoint(path, map_location)
    model = model_for_checkpoint(ckpt, path)
    load_model_state(model, ckpt["model"], path)
    model.to(map_location).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng", "rank_loss")}
    return model, meta


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", name: str | None = None,
                    required: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """The checkpoint dict in the local file `path`, loaded as data; a missing, truncated or corrupt file, or
    one without the `required` keys, is one ConfigError line naming `name` (default: `path`)."""
    name = name or str(path)
    try:
        # weights_only=True: a checkpoint is data, never code (issue 8, security).
        ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {name} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - EOFError, UnpicklingError, zip reader RuntimeError, BadZipFile, ...
        raise ConfigError(f"checkpoint {name}: not a readable checkpoint, truncated or corrupt "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"checkpoint {name}: holds a {type(ckpt).__name__}, not an hpa training checkpoint (a dict)")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ConfigError(f"checkpoint {name}: missing key {missing[0]!r}"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                          + " (not an hpa training checkpoint of this kind)")
    return ckpt


def model_for_checkpoint(ckpt: dict, name: str) -> HPAModel:
    """A fresh model of the checkpoint's recorded arch, channels, classes and drop rate (not yet loaded)."""
    arch, in_chans, num_classes = ckpt["arch"], ckpt["in_chans"], ckpt["num_classes"]
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    drop_rate = config.get("drop_rate", 0.0)
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ConfigError(f"checkpoint {name}: arch {arch!r} is not a known model ({', '.join(MODEL_NAMES)})")
    if isinstance(in_chans, bool) or in_chans not in (3, 4):
        raise ConfigError(f"checkpoint {name}: in_chans {in_chans!r}, expected 3 or 4")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"checkpoint {name}: num_classes {num_classes!r}, expected a positive integer")
    if not isinstance(drop_rate, (int, float)) or isinstance(drop_rate, bool) or not 0 <= drop_rate < 1:
        raise ConfigError(f"checkpoint {name}: config.drop_rate {drop_rate!r}, expected a number in [0, 1)")
    return create_model(arch, in_chans, num_classes, drop_rate=float(drop_rate))


def load_model_state(model: HPAModel, state, name: str) -> None:
    """model.load_state_dict(state), or one ConfigError line naming `name` when the weights are not this
    model's (another arch, channel count or head): a few missing/unexpected/reshaped keys, not torch's list."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConfigError(f"checkpoint {name}: 'model' is not a state dict (name -> tensor)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        what = f"{model.arch} with {model.in_chans} input channels and {model.num_classes} classes"
        detail = (f"{len(missing)} missing keys {missing[:2]}, {len(unexpected)} unexpected keys {unexpected[:2]}"
                  if missing or unexpected else
                  f"{len(wrong)} keys of another shape, e.g. {wrong[0]!r} is {tuple(state[wrong[0]].shape)}, "
                  f"expected {tuple(own[wrong[0]].shape)}")
        raise ConfigError(f"checkpoint {name}: its weights do not match its recorded arch ({what}): {detail}")
    model.load_state_dict(state)
