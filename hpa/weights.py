"""Pretrained weights for hpa.models.create_model: what `--weights` names, read as a 3-channel state dict.

`read_weights(spec, arch)` reads "imagenet" (timm's pretrained weights, only when the model hub is reachable: the
probe fails fast instead of timm's ~45 s hang), a local file (torch.save state dict or .safetensors) or an s3://
URI read through `hpa.store` (sha256-verified when a manifest or the object's recorded sha256 exists). Every
problem is one ConfigError line naming the file. `weights_source(spec)` is the form a checkpoint records (no
credentials, no query).

The `weights` run parameter is per model (`weights_by_model`): a JSON object model name -> source, e.g.
`{"resnet18": "s3://bucket/r18.pt", "se_resnet18": "imagenet"}`; models it does not name start from random init,
and "" or {} means random init for all. One file for every model cannot work: a resnet18 state dict does not fit
se_resnet18. `hpa.weights_check.check_weights` verifies each named file against its architecture before any data
is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

import torch

from hpa.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

# Our arch name -> timm's model name, whose (default-tag) pretrained weights `--weights imagenet` loads.
# timm's resnet/densenet state dicts use the torchvision key names (tests/test_weights.py checks that every
# backbone here has exactly the keys and shapes of its timm model).
TIMM_NAMES = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
              "se_resnet18": "seresnet18", "se_resnet50": "seresnet50", "densenet121": "densenet121"}
IMAGENET = "imagenet"
HUB_PROBE_TIMEOUT = 3.0  # seconds for DNS + TCP connect to the hub before `imagenet` gives up
SKIP_PROBE_ENV = "HPA_WEIGHTS_SKIP_PROBE"  # "1": call timm without probing (e.g. a proxy the probe cannot see)


def weights_source(spec: str | Path | None) -> str:
    """What a checkpoint records for `spec`: "" (random init), "imagenet", a local path, or an s3:// URI
    without credentials (`user:secret@`), query string or fragment (S3 keys come from HPA_S3_*)."""
    spec = "" if spec is None else str(spec).strip()
    if not spec.startswith("s3://"):
        return spec
    rest = re.split(r"[?#]", spec[len("s3://"):], maxsplit=1)[0]
    netloc, slash, path = rest.partition("/")
    return "s3://" + netloc.rpartition("@")[2] + slash + path


def _read_state_dict(path: str | Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local torch.save file (weights_only) or a .safetensors file; `name` is what
    messages call it (the s3:// URI when `path` is its downloaded copy)."""
    name = name or str(path)
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"weights: {name} is a .safetensors file but safetensors is not installed") from None
        if not Path(path).is_file():
            raise ConfigError(f"weights: file {name} does not exist") from None
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad weights file
            raise ConfigError(f"weights: {name} is not a loadable safetensors file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"weights: file {name} does not exist (expected imagenet, a local state-dict file "
                              f"or an s3:// URI)") from None
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad weights file
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(f"weights: {name} is not a loadable state dict ({type(exc).__name__}: {first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights: {name} does not hold a state dict (name -> tensor)")
    # Old torchvision densenet files name `norm.1` what modules now call `norm1`.
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                         r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    return {pattern.sub(r"\1\2", k).removeprefix("module."): v for k, v in state.items()}


def _read_s3_weights(uri: str) -> dict[str, torch.Tensor]:
    """Read an s3:// weights object through hpa.store, verified against the sha256 of a `manifest.json`
    beside it or, failing that, the sha256 recorded when hpa.store wrote it; a bare object (uploaded by
    other tools, no manifest) is read unverified, and the log says so."""
    from hpa import store

    try:
        parent, key = store.split_uri(uri)
        if not parent.exists(key):
            raise ConfigError(f"weights: {uri} does not exist")
        expected, how = None, ""
        if parent.exists(store.MANIFEST):
            entry = next((e for e in parent.read_manifest()["objects"] if e["key"] == key), None)
            if entry is not None:
                expected, how = entry["sha256"], "the manifest's sha256"
        if expected is None:
            expected = parent.stored_sha256(key)
            how = "its recorded sha256" if expected else ""
        with tempfile.TemporaryDirectory(prefix="hpa-weights-") as tmp:
            local = Path(tmp) / key.rsplit("/", 1)[-1]
            parent.get_file(key, local, sha256=expected)
            if how:
                log.info("weights: read %s, verified against %s", uri, how)
            else:
                log.warning("weights: read %s UNVERIFIED: no manifest entry and no recorded sha256 (not written "
                            "by hpa.store)", uri)
            return _read_state_dict(local, name=uri)
    except StoreError as exc:
        raise ConfigError(f"weights: cannot read {uri}: {exc}") from None


def _hub_address(timm_name: str) -> tuple[str, int]:
    """(host, port) that timm's pretrained download contacts first: the Hugging Face hub (HF_ENDPOINT)
    when the model has an hf_hub_id (timm 1.x prefers it), else the weights URL's host; an HTTPS proxy
    from the environment instead when one is set, since that is what the download will connect to."""
    from timm.models import get_pretrained_cfg

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    cfg = get_pretrained_cfg(timm_name)
    url = proxy or (os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.hf_hub_id else cfg.url) or ""
    parts = urlsplit(url if "://" in url else "http://" + url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _reachable(host: str, port: int, timeout: float) -> bool:
    """DNS lookup + TCP connect within `timeout` seconds overall (getaddrinfo has no timeout of its own,
    hence the thread)."""
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """timm's default pretrained weights for `arch` (3-channel, 1000 classes).

    Not testable here (no network): the successful download itself. The tests cover the probe's fast
    failure and, with HF_HUB_OFFLINE=1 and a pre-filled Hugging Face cache, this very timm call.
    """
    import timm

    timm_name = TIMM_NAMES[arch]
    alternative = f"pass --weights <local file or s3:// URI> of a 3-channel {arch} state dict instead"
    if not timm.list_models(timm_name, pretrained=True):
        raise ConfigError(f"weights: timm has no ImageNet weights for {arch} ({timm_name}); {alternative}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and os.environ.get(SKIP_PROBE_ENV) != "1":
        host, port = _hub_address(timm_name)
        if not _reachable(host, port, HUB_PROBE_TIMEOUT):
            raise ConfigError(f"weights: imagenet needs the model hub but {host}:{port} is unreachable within "
                              f"{HUB_PROBE_TIMEOUT:g} s (no network?); {alternative}")
    try:
        # The normal timm pretrained load (Hugging Face hub download + cache); with HF_HUB_OFFLINE=1
        # it reads the local cache only.
        return timm.create_model(timm_name, pretrained=True).state_dict()
    except Exception as exc:  # noqa: BLE001 - hub, HTTP and cache errors all mean "no ImageNet weights"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        where = " (HF_HUB_OFFLINE=1: only the local Hugging Face cache is read)" if offline else ""
        raise ConfigError(f"weights: imagenet: timm could not load {timm_name} pretrained weights{where} "
                          f"({type(exc).__name__}: {first[:200]}); {alternative}") from None


def read_weights(spec: str | Path, arch: str) -> dict[str, torch.Tensor]:
    """The 3-channel state dict that `spec` names (imagenet, local file or s3:// URI) for `arch`."""
    spec = str(spec).strip()
    if spec == IMAGENET:
        return _imagenet_state_dict(arch)
    if spec.startswith("s3://"):
        return _read_s3_weights(weights_source(spec))
    if re.match(r"^[a-z][a-z0-9+.-]*://", spec):
        raise ConfigError(f"weights: unsupported URI scheme in {weights_source(spec).split('://')[0]}://..., "
                          f"expected imagenet, a local file or an s3:// URI")
    return _read_state_dict(spec)


def check_spec(spec: str, field: str) -> str:
    """One weights source as `field` names it: "", imagenet, a local path or an s3:// URI (no spaces, no other
    scheme); returns it stripped, or one ConfigError line."""
    if not isinstance(spec, str):
        raise ConfigError(f"{field}: expected a string (imagenet, a file path or s3:// URI), got {type(spec).__name__}")
    spec = spec.strip()
    if any(c.isspace() for c in spec):
        raise ConfigError(f"{field}: {weights_source(spec)!r} holds whitespace; expected imagenet, a file path or an "
                          "s3:// URI")
    if re.match(r"^[a-z][a-z0-9+.-]*://", spec) and not spec.startswith("s3://"):
        raise ConfigError(f"{field}: unsupported URI scheme {spec.split('://')[0]}://, expected imagenet, a local "
                          "file or an s3:// URI")
    return spec


def weights_by_model(value: str | dict | None, models: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The `weights` run parameter as {model: source} for every model of `models` ("" = random init).

    `value`: a JSON object (or dict) model name -> source (imagenet, a local file, an s3:// URI, or "" for random
    init); "", "{}" or None = random init for all; the bare word `imagenet` = ImageNet weights for every model (the
    only source that fits every architecture). A name not in `models`, a source that is not a string or has
    another URI scheme, and a single file or URI for all models are refused with one ConfigError line.
    """
    models = list(models)
    if value is None or (isinstance(value, str) and value.strip() in ("", "{}")):
        return {m: "" for m in models}
    if isinstance(value, str) and value.strip() == IMAGENET:
        return {m: IMAGENET for m in models}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"weights: {weights_source(value)!r} is one source for every model; expected a JSON "
                              'object model -> source, e.g. {"resnet18": "s3://bucket/r18.pt", "se_resnet18": '
                              '"imagenet"} (models not named start from random init)') from None
    if not isinstance(value, dict):
        raise ConfigError(f"weights: expected a JSON object model -> source, got a JSON {type(value).__name__}")
    unknown = [name for name in value if name not in models]
    if unknown:
        raise ConfigError(f"weights: model {unknown[0]!r} is not one of this run's models ({', '.join(models)})")
    return {m: check_spec(value.get(m, ""), f"weights[{m}]") for m in models}
