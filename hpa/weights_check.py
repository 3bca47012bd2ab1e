"""Per-model weights checked before any data is downloaded (the check-params task), not at training time.

`check_weights(value, models)` parses the `weights` run parameter (hpa.weights.weights_by_model) and, for every
model given a local file or an s3:// URI, reads that state dict (torch.load weights_only, or safetensors; an s3://
object through hpa.store, verified as hpa.weights reads it) and compares its keys and shapes with the architecture
built on the meta device (no memory, no init cost): the 3-channel ImageNet-shaped backbone that
hpa.models.create_model loads and then adapts to 4 input channels; the head may have any size. A file that does
not fit is one ConfigError line naming the model and the file, so a resnet18 file given to se_resnet18 fails in
seconds instead of after download, split and pack. `imagenet` is timm's weights of that very architecture: nothing
to compare (its download is the training task's, hpa.weights).
"""

from __future__ import annotations

import logging

import torch

from hpa.errors import ConfigError
from hpa.models import ARCHS, _check_matches
from hpa.weights import IMAGENET, read_weights, weights_by_model, weights_source

log = logging.getLogger(__name__)


def architecture_shapes(arch: str) -> dict[str, torch.Size]:
    """{key: shape} of `arch`'s 3-channel backbone state dict, built on the meta device (no weights allocated)."""
    if arch not in ARCHS:
        raise ConfigError(f"weights: unknown model {arch!r}, expected one of {', '.join(ARCHS)}")
    with torch.device("meta"):
        backbone = ARCHS[arch].build()
    return {k: v.shape for k, v in backbone.state_dict().items()}


def check_weights(value: str | dict | None, models: list[str] | tuple[str, ...]) -> dict[str, str]:
    """{model: source} of the `weights` run parameter, every local or s3:// file verified to fit its model;
    one ConfigError line otherwise (hpa.weights.weights_by_model's refusals, an unreadable file, a mismatch)."""
    by_model = weights_by_model(value, models)
    for arch, spec in by_model.items():
        if not spec or spec == IMAGENET:
            continue
        state = read_weights(spec, arch)
        own = {k: torch.empty(shape, device="meta") for k, shape in architecture_shapes(arch).items()}
        _check_matches(own, state, arch, ARCHS[arch].head + ".", weights_source(spec))
        log.info("weights: %s fits %s (%d tensors)", weights_source(spec), arch, len(state))
    return by_model
