"""Pretrained starts (`--weights`): local files, s3:// objects, `imagenet` without network, and a training
run that starts from the given weights. Nothing downloads: every weights file is a randomly initialised
3-channel ImageNet-shaped model saved by the test, and `imagenet` is only ever tried where the hub is
unreachable (or offline against a Hugging Face cache the test fills itself).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hpa import store
from hpa.errors import ConfigError
from hpa.models import ARCHS, create_model
from hpa.weights import IMAGENET, TIMM_NAMES, weights_source
from hpa.train import TrainConfig

torch.set_num_threads(1)
HUB_HANG_S = 45  # what timm.create_model(pretrained=True) costs without network (DESIGN.md)


def imagenet_like(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A 3-channel, 1000-class state dict of `name`, random init: stands in for ImageNet weights."""
    torch.manual_seed(seed)
    return ARCHS[name].build().state_dict()


def save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def assert_started_from(model, state: dict, name: str, in_chans: int = 4) -> None:
    """Stem: RGB filters bit-identical to the file's, yellow = their mean; every other backbone tensor
    but the head is the file's; the head is the 28-class one, not the file's 1000-class one."""
    spec = ARCHS[name]
    stem_key, head = spec.first_conv + ".weight", spec.head + "."
    w = model.first_conv().weight.detach()
    assert w.shape[1] == in_chans
    assert torch.equal(w[:, :3], state[stem_key])
    if in_chans == 4:
        torch.testing.assert_close(w[:, 3], state[stem_key].mean(dim=1))
    own = model.backbone.state_dict()
    for key, value in state.items():
        if key != stem_key and not key.startswith(head):
            assert torch.equal(own[key], value), key
    assert own[head + "weight"].shape[0] == 28 and state[head + "weight"].shape[0] == 1000


# --- local files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "se_resnet18"])
def test_local_file_loads_with_4_channel_stem_and_new_head(name, tmp_path, caplog):
    state = imagenet_like(name)
    path = save(state, tmp_path / "w.pth")
    with caplog.at_level(logging.INFO, logger="hpa.models"):
        model = create_model(name, in_chans=4, weights=str(path))
    assert_started_from(model, state, name)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("weights:"))
    head = ARCHS[name].head
    n_body = sum(not k.startswith(head + ".") for k in state)
    assert f"loaded {n_body - 1} tensors" in line
    assert f"adapted {ARCHS[name].first_conv}.weight (3 -> 4 channels" in line
    assert f"skipped {head}.bias(1000,), {head}.weight(1000, 512) (head re-initialised for 28 classes)" in line
    # two builds from the same file differ only where they must: the freshly initialised head
    other = create_model(name, in_chans=4, weights=str(path))
    assert not torch.equal(other.backbone.state_dict()[head + ".weight"], model.backbone.state_dict()[head + ".weight"])


def test_safetensors_file_and_a_28_class_head_is_kept(tmp_path, caplog):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    state = imagenet_like("resnet18")
    state["fc.weight"], state["fc.bias"] = torch.randn(28, 512), torch.randn(28)
    save_file(state, str(tmp_path / "w.safetensors"))
    with caplog.at_level(logging.INFO, logger="hpa.models"):
        model = create_model("resnet18", in_chans=4, weights=tmp_path / "w.safetensors")
    assert torch.equal(model.backbone.fc.weight.detach(), state["fc.weight"])  # same shape: loaded, not re-initialised
    assert torch.equal(model.first_conv().weight.detach()[:, :3], state["conv1.weight"])
    assert "skipped none" in caplog.text


def test_mismatched_file_fails_with_one_line_naming_file_and_keys(tmp_path):
    se = save(imagenet_like("se_resnet18"), tmp_path / "se18.pt")
    with pytest.raises(ConfigError) as err:
        create_model("resnet18", weights=str(se))
    msg = str(err.value)
    assert "\n" not in msg and str(se) in msg and "does not match resnet18" in msg
    assert "0 missing keys" in msg and "unexpected keys ['layer1.0.se." in msg

    truncated = {k: v for k, v in imagenet_like("resnet18").items() if not k.startswith("layer4.")}
    path = save(truncated, tmp_path / "r18-part.pt")
    with pytest.raises(ConfigError,
                       match=r"r18-part\.pt does not match resnet18: \d+ missing keys \['layer4\.0\.") as err:
        create_model("resnet18", weights=str(path))
    assert "\n" not in str(err.value)

    with pytest.raises(ConfigError, match="is not a loadable state dict"):
        create_model("resnet18", weights=str(save_bytes(tmp_path / "junk.pt", b"not a torch file")))
    with pytest.raises(ConfigError, match="unsupported URI scheme in https://"):
        create_model("resnet18", weights="https://example.com/w.pt")


def save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_timm_models_have_our_backbone_keys():
    """`imagenet` feeds timm's state dict through the same loader, so each timm model must have exactly
    our backbone's keys and shapes (checked with random init: nothing downloads)."""
    import timm

    for name, timm_name in TIMM_NAMES.items():
        ours = {k: v.shape for k, v in ARCHS[name].build().state_dict().items()}
        theirs = {k: v.shape for k, v in timm.create_model(timm_name, pretrained=False).state_dict().items()}
        assert ours == theirs, name


# --- s3:// ---------------------------------------------------------------------------------------------

def _state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_s3_weights_verified_by_recorded_sha256_and_by_manifest(s3_bucket, caplog):
    state = imagenet_like("resnet18", seed=3)
    uri = s3_bucket + "weights/r18.pt"
    store.write_bytes(uri, _state_bytes(state))  # hpa.store records the sha256 in the object's metadata
    with caplog.at_level(logging.INFO, logger="hpa"):
        model = create_model("resnet18", in_chans=4, weights=uri)
    assert_started_from(model, state, "resnet18")
    assert f"weights: read {uri}, verified against its recorded sha256" in caplog.text
    assert "from " + uri in caplog.text

    # a committed weights folder: the manifest's sha256 wins
    folder = store.open_store(s3_bucket + "zoo")
    data = _state_bytes(state)
    digest = folder.put_bytes("r18.pt", data)
    folder.commit_manifest([{"key": "r18.pt", "size": len(data), "sha256": digest}], meta={"kind": "weights"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hpa"):
        create_model("resnet18", weights=s3_bucket + "zoo/r18.pt")
    assert "verified against the manifest's sha256" in caplog.text


def test_s3_bare_object_is_read_unverified_and_corruption_and_absence_fail(s3_server, s3_bucket, caplog):
    from minio import Minio

    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False, region="us-east-1")
    bucket = s3_bucket[5:].rstrip("/")
    state = imagenet_like("resnet18", seed=4)
    data = _state_bytes(state)
    client.put_object(bucket, "bare/r18.pt", io.BytesIO(data), len(data))  # another tool: no sha256 metadata
    with caplog.at_level(logging.INFO, logger="hpa"):
        model = create_model("resnet18", weights=s3_bucket + "bare/r18.pt")
    assert_started_from(model, state, "resnet18")
    assert "UNVERIFIED" in caplog.text

    wrong = hashlib.sha256(b"other").hexdigest()
    client.put_object(bucket, "bad/r18.pt", io.BytesIO(data), len(data), metadata={"sha256": wrong})
    with pytest.raises(ConfigError, match=r"weights: cannot read s3://.*bad/r18\.pt: corrupted object") as err:
        create_model("resnet18", weights=s3_bucket + "bad/r18.pt")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"weights: s3://.*nope\.pt does not exist"):
        create_model("resnet18", weights=s3_bucket + "nope.pt")


def test_recorded_source_has_no_credentials_or_query():
    assert weights_source("s3://AKIAX:s3cr3t@bucket/w/r18.pt?X-Amz-Signature=abc#frag") == "s3://bucket/w/r18.pt"
    assert weights_source("s3://bucket/w/r18.pt") == "s3://bucket/w/r18.pt"
    assert weights_source(None) == "" and weights_source(" imagenet ") == IMAGENET
    assert weights_source("/tmp/a?b.pt") == "/tmp/a?b.pt"  # a local path is kept as it is
    cfg = TrainConfig(data="d", split="s.csv", out="o", weights="s3://k:secret@b/w.pt?token=t").validate()
    assert cfg.weights == "s3://b/w.pt"
    assert TrainConfig(data="d", split="s.csv", out="o").validate().weights == ""


# --- imagenet --------------------------------------------------------------------------------------------

def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


def _clear_hub_env(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HPA_WEIGHTS_SKIP_PROBE", "HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def test_imagenet_without_network_fails_fast_with_one_line(monkeypatch):
    if _hub_reachable():
        pytest.skip("huggingface.co is reachable here: this test must not download")
    _clear_hub_env(monkeypatch)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        create_model("resnet18", weights=IMAGENET)
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert elapsed < 10 < HUB_HANG_S, elapsed
    assert "\n" not in msg and msg.startswith(
        "weights: imagenet needs the model hub but huggingface.co:443 is unreachable")
    assert "--weights <local file or s3:// URI>" in msg


def test_imagenet_probe_refused_endpoint_and_arch_without_weights(monkeypatch):
    _clear_hub_env(monkeypatch)
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port} is unreachable"):
        create_model("resnet50", weights=IMAGENET)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConfigError,
                       match=r"timm has no ImageNet weights for se_resnet18 \(seresnet18\); pass --weights"):
        create_model("se_resnet18", weights=IMAGENET)


def test_imagenet_probe_gives_up_on_a_silent_endpoint_within_its_timeout(monkeypatch):
    """Egress dropped without a reply (a cluster with DNS but no route out): the connect would hang, the
    probe stops at HUB_PROBE_TIMEOUT. Stand-in for the silent host: a loopback listener whose accept
    backlog is full, so further SYNs go unanswered."""
    import hpa.weights

    _clear_hub_env(monkeypatch)
    monkeypatch.setattr(hpa.weights, "HUB_PROBE_TIMEOUT", 1.0)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        fillers = []
        try:
            while True:  # fill the backlog until a connect stops being answered
                c = socket.socket()
                c.settimeout(0.5)
                fillers.append(c)
                c.connect(("127.0.0.1", port))
        except OSError:
            pass
        monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{port}")
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} is unreachable within 1 s"):
            create_model("resnet18", weights=IMAGENET)
        assert 0.9 < time.monotonic() - t0 < 5
        for c in fillers:
            c.close()


def _run_offline(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HTTPS_PROXY", "https_proxy", "HF_ENDPOINT")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def test_imagenet_offline_uses_timms_real_loader_on_a_filled_cache(tmp_path):
    """HF_HUB_OFFLINE=1 skips the probe and runs the real `timm.create_model(pretrained=True)`, which
    reads the Hugging Face cache only: filled by the test with a random resnet18 as
    `timm/resnet18.a1_in1k`'s model.safetensors, the model starts from it; with an empty cache it fails
    in one line, fast. (huggingface_hub reads HF_HUB_OFFLINE at import, hence the subprocesses.)"""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    code = ("import sys, torch; from hpa.models import create_model\n"
            "try:\n    m = create_model('resnet18', 4, weights='imagenet')\n"
            "except Exception as e:\n    print('ERROR', e); sys.exit(3)\n"
            "torch.save(m.first_conv().weight.detach(), sys.argv[1])\n")
    t0 = time.monotonic()
    empty = _run_offline(tmp_path, code, str(tmp_path / "unused.pt"))
    assert empty.returncode == 3, empty.stderr[-2000:]
    assert time.monotonic() - t0 < 30
    line = empty.stdout.strip()
    assert "\n" not in line and "timm could not load resnet18 pretrained weights (HF_HUB_OFFLINE=1" in line

    repo = get_pretrained_cfg("resnet18").hf_hub_id  # e.g. timm/resnet18.a1_in1k
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    (cache / "snapshots" / commit).mkdir(parents=True)
    state = imagenet_like("resnet18", seed=5)
    save_file({k: v.contiguous() for k, v in state.items()}, str(cache / "snapshots" / commit / "model.safetensors"))
    stem = tmp_path / "stem.pt"
    filled = _run_offline(tmp_path, code, str(stem))
    assert filled.returncode == 0, filled.stdout + filled.stderr[-2000:]
    w = torch.load(stem, weights_only=True)
    assert torch.equal(w[:, :3], state["conv1.weight"])
    torch.testing.assert_close(w[:, 3], state["conv1.weight"].mean(dim=1))


# --- training ------------------------------------------------------------------------------------------

def test_training_starts_from_the_weights_file_and_records_it(tmp_path):
    """`python -m hpa train --weights FILE`: with a learning rate of 1e-9 one epoch cannot move the
    weights measurably, so last.pt's backbone is still the file's (a random start would be far off),
    and its config records the file."""
    from hpa.synthetic import generate

    generate(tmp_path / "data", 16, 0, size=32, seed=0)
    df = pd.read_csv(tmp_path / "data" / "train.csv", dtype=str)
    df["fold"] = np.arange(len(df)) % 4
    df.to_csv(tmp_path / "split.csv", index=False)
    state = imagenet_like("resnet18", seed=6)
    path = save(state, tmp_path / "r18.pt")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hpa", "train", "--data", str(tmp_path / "data"),
           "--split", str(tmp_path / "split.csv"), "--out", str(out), "--fold", "0", "--arch", "resnet18",
           "--workers", "0", "--threads", "1",
           "--size", "32", "--epochs", "1", "--batch-size", "4", "--lr", "1e-9", "--weight-decay", "0",
           "--warmup-epochs", "0", "--no-augment", "--weights", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights: resnet18 from " + str(path) + ": loaded" in proc.stderr
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["weights"] == str(path) and ckpt["step"] >= 1
    model = ckpt["model"]
    stem = model["backbone.conv1.weight"]
    torch.testing.assert_close(stem[:, :3], state["conv1.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(stem[:, 3], state["conv1.weight"].mean(dim=1), atol=1e-6, rtol=0)
    for key in ("layer1.0.conv1.weight", "layer4.1.conv2.weight"):
        torch.testing.assert_close(model["backbone." + key], state[key], atol=1e-6, rtol=0)
    assert model["backbone.fc.weight"].shape == (28, 512)
