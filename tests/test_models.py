"""Every model builds and trains one step at 64 px with 4 and 3 channels; local weights keep RGB filters
(the `--weights` sources themselves: tests/test_weights.py)."""

import pytest
import torch

from hpa.errors import ConfigError
from hpa.models import ARCHS, MODEL_NAMES, adapt_first_conv, create_model, load_checkpoint

torch.set_num_threads(1)


@pytest.mark.parametrize("in_chans", [4, 3])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_and_trains_one_step(name, in_chans):
    torch.manual_seed(0)
    model = create_model(name, in_chans=in_chans, num_classes=28, drop_rate=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(2, in_chans, 64, 64)
    y = (torch.rand(2, 28) > 0.8).float()
    before = model.first_conv().weight.detach().clone()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert model.first_conv().weight.shape[1] == in_chans
    assert not torch.equal(before, model.first_conv().weight)
    model.eval()
    with torch.no_grad():
        # uint8 input is accepted and means the same image as its [0, 1] float.
        xu = (x * 255).round().to(torch.uint8)
        torch.testing.assert_close(model(xu), model(xu.float() / 255))


@pytest.mark.parametrize("name", ["resnet18", "se_resnet18", "densenet121"])
def test_local_weights_keep_rgb_filters(name, tmp_path):
    torch.manual_seed(1)
    src = ARCHS[name].build()  # 3-channel, 1000-class ImageNet-shaped model, random "pretrained" weights
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    stem_key = ARCHS[name].first_conv + ".weight"
    rgb = src.state_dict()[stem_key]

    model = create_model(name, in_chans=4, weights=path)
    w = model.first_conv().weight.detach()
    assert torch.equal(w[:, :3], rgb)  # documented rule: RGB bit-identical, no rescale
    torch.testing.assert_close(w[:, 3], rgb.mean(dim=1))
    # every other backbone tensor but the head is the loaded one
    own = model.backbone.state_dict()
    head = ARCHS[name].head + "."
    for key, value in src.state_dict().items():
        if key != stem_key and not key.startswith(head):
            assert torch.equal(own[key], value), key
    assert own[head + "weight"].shape == (28, own[head + "weight"].shape[1])

    model3 = create_model(name, in_chans=3, weights=path)
    assert torch.equal(model3.first_conv().weight.detach(), rgb)


def test_adapt_first_conv_rule():
    w = torch.randn(8, 3, 7, 7)
    out = adapt_first_conv(w, 4)
    assert torch.equal(out[:, :3], w) and torch.allclose(out[:, 3], w.mean(1))


def test_bad_requests_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        create_model("vgg")
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("resnet18", weights=tmp_path / "nope.pt")
    torch.save(create_model("resnet34", in_chans=3).backbone.state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ConfigError, match="does not match resnet18|shape"):
        create_model("resnet18", weights=tmp_path / "r34.pt")


def test_load_checkpoint_roundtrip(tmp_path):
    model = create_model("resnet18", in_chans=4, drop_rate=0.1)
    ckpt = {"model": model.state_dict(), "arch": "resnet18", "in_chans": 4, "num_classes": 28,
            "color_mode": "rgby", "size": 64, "epoch": 1, "config": {"drop_rate": 0.1}}
    torch.save(ckpt, tmp_path / "c.pt")
    loaded, meta = load_checkpoint(tmp_path / "c.pt")
    assert meta["size"] == 64 and "model" not in meta and not loaded.training
    x = torch.rand(1, 4, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_empty_weights_is_random_init(caplog):
    torch.manual_seed(3)
    a = create_model("resnet18", weights="")
    torch.manual_seed(3)
    b = create_model("resnet18", weights=None)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert "weights:" not in caplog.text
