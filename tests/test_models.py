import pytest
import torch

from cpq_lib.errors import CheckpointError, ModelError
from cpq_lib.models import MODELS, build_model, count_parameters, load_checkpoint, load_pretrained, save_checkpoint


# every registry entry (the test below fails when an entry is added without a row here); torchvision's
# counts are torchvision's own for 10 classes (input normalisation adds buffers, no parameters)
BUILDS = {
    "digits_cnn": ({"in_channels": 1}, (2, 1, 8, 8), 24_058),
    "resnet20": ({}, (2, 3, 32, 32), 272_474),
    "resnet32": ({}, (2, 3, 32, 32), 466_906),
    "vgg_small": ({}, (2, 3, 32, 32), 4_660_106),
    "resnet18": ({}, (2, 3, 32, 32), 11_181_642),
    "resnet50": ({}, (2, 3, 32, 32), 23_528_522),
    "mobilenet_v2": ({}, (2, 3, 32, 32), 2_236_682),
}


def test_every_registered_model_is_tested():
    assert set(MODELS) == set(BUILDS)


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_models_build_and_run(name):
    kwargs, shape, params = BUILDS[name]
    model = build_model(name, 10, **kwargs).eval()
    assert model(torch.rand(shape)).shape == (2, 10)
    assert count_parameters(model) == params


def test_torchvision_models_keep_torchvision_names_and_take_its_weights(tmp_path):
    import torchvision

    from cpq_lib.models.torchvision_models import load_torchvision_weights

    reference = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    model = build_model("resnet18", 10, mean=mean, std=std).eval()
    assert load_torchvision_weights(model, "resnet18", path) == {"weights_file": "resnet18.pt"}
    assert set(model.state_dict()) == set(reference.state_dict()) | {"input_norm.mean", "input_norm.std"}
    x = torch.rand(2, 3, 40, 40)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), reference(normalised))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="do not fit resnet18: .*size mismatch"):
        load_torchvision_weights(model, "resnet18", tmp_path / "other.pt")
    torch.save({"fc.bias": torch.zeros(10)}, tmp_path / "part.pt")
    with pytest.raises(CheckpointError, match=r"do not fit resnet18: missing \['conv1.weight'"):
        load_torchvision_weights(model, "resnet18", tmp_path / "part.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_torchvision_weights(model, "resnet18", tmp_path / "missing.pt")
    with pytest.raises(ModelError, match="RGB images.*in_channels=1"):
        build_model("resnet18", 10, in_channels=1)
    with pytest.raises(ModelError, match="width must be 1.0, got 0.5"):
        build_model("resnet50", 10, width=0.5)
    narrow = build_model("mobilenet_v2", 10, width=0.25)  # torchvision's width_mult
    assert narrow.features[0][0].out_channels == 8 and count_parameters(narrow) < 0.2 * BUILDS["mobilenet_v2"][2]


def test_width_multiplier_and_class_count():
    wide = build_model("resnet20", 100, width=5)
    assert wide.conv1.out_channels == 80 and wide.layer3[0].conv1.out_channels == 320 and wide.fc.out_features == 100


def test_unknown_model_and_bad_arguments():
    with pytest.raises(ModelError, match="unknown model 'resnet99'.*resnet20"):
        build_model("resnet99", 10)
    with pytest.raises(ModelError, match="positive integer, got 0"):
        build_model("resnet20", 0)
    with pytest.raises(ModelError, match="bad arguments"):
        build_model("digits_cnn", 10, colour=True)
    assert set(MODELS) >= {"digits_cnn", "resnet20", "vgg_small"}


def _card(**extra):
    return {"model": "digits_cnn", "model_kwargs": {"num_classes": 10, "in_channels": 1}, **extra}


def test_checkpoint_round_trip(tmp_path):
    model = build_model("digits_cnn", 10, in_channels=1)
    save_checkpoint(model, tmp_path / "m.pt", _card(epochs=3))
    loaded, card = load_checkpoint(tmp_path / "m.pt", model="digits_cnn", num_classes=10)
    assert card["epochs"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_checkpoint_errors(tmp_path):
    model = build_model("digits_cnn", 10, in_channels=1)
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, _card())
    with pytest.raises(CheckpointError, match="holds model 'digits_cnn', not the requested 'resnet20'"):
        load_checkpoint(path, model="resnet20")
    with pytest.raises(CheckpointError, match="class count mismatch.*10 classes.*100"):
        load_checkpoint(path, num_classes=100)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="model_kwargs"):
        save_checkpoint(model, tmp_path / "x.pt", {"model": "digits_cnn"})


def test_corrupted_and_truncated_checkpoints(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(build_model("digits_cnn", 10, in_channels=1), path, _card())
    blob = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 100)
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(CheckpointError, match="corrupted"):
            load_checkpoint(tmp_path / name)


def test_architecture_mismatch(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(build_model("digits_cnn", 10, in_channels=1, width=2.0),
                    path, _card())  # card says width 1: weights do not fit
    with pytest.raises(CheckpointError, match="does not match architecture"):
        load_checkpoint(path)


class Gadget:  # an arbitrary object: must never be unpickled from a checkpoint
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "cpq-checkpoint/1", "card": Gadget(), "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(path)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="format None"):
        load_checkpoint(plain)


def test_missing_pretrained_lists_what_exists():
    with pytest.raises(CheckpointError, match="no shipped checkpoint for 'vgg_small' on 'cifar100'"):
        load_pretrained("vgg_small", "cifar100")


def test_card_must_be_plain_json(tmp_path):
    with pytest.raises(CheckpointError, match="JSON values only"):
        save_checkpoint(build_model("digits_cnn", 10, in_channels=1), tmp_path / "m.pt", _card(extra=Gadget()))
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("payload,message", [
    ({"format": "cpq-checkpoint/1", "state_dict": {}}, "no model card"),
    ({"format": "cpq-checkpoint/1", "card": {"model": "digits_cnn"}, "state_dict": {}}, r"lacks \['model_kwargs'\]"),
    ({"format": "cpq-checkpoint/1", "card": {"model": "digits_cnn", "model_kwargs": {"num_classes": 10}}}, "no weights"),
])
def test_right_format_tag_but_missing_parts(tmp_path, payload, message):
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_malformed_card_json_names_the_file(tmp_path):
    from cpq_lib.models.pretrained import read_card

    path = tmp_path / "card.json"
    path.write_text('{"model": "resnet20",', encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"model card {path} is not valid JSON"):
        read_card(path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        read_card(path)


def test_pixels_outside_the_unit_range_warn_once():
    import warnings

    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    with pytest.warns(UserWarning, match=r"model input ranges from .* to 25\d; the model expects images in \[0, 1\] \(pixels in 0..255"):
        model(torch.rand(2, 3, 32, 32) * 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model: later batches are not read back from the device
        model(torch.rand(2, 3, 32, 32) * 255)
        fresh = build_model("resnet20", 10).eval()
        fresh(torch.rand(2, 3, 32, 32))  # images in [0, 1]: nothing to say
        fresh(torch.rand(2, 3, 32, 32) * 255)  # only the first batch is checked


def test_quick_model_gradients_do_not_depend_on_the_summation_order():
    """Quantized DigitsCNN's training gradients are the same when the convolutions sum in another
    order (channels_last vs contiguous kernels here; another instruction set on another CPU). Its
    quantized convolutions output many mathematically equal values that the order splits in the last
    bit; with max pooling the gradient followed whichever came out larger (measured 7% apart here)."""
    from torch import nn

    from cpq_lib.quant import QuantConfig, calibrate_, quantize_

    torch.set_default_dtype(torch.float64)  # as the quick profile computes (conftest restores the default)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    torch.manual_seed(0)
    model = quantize_(build_model("digits_cnn", 10, in_channels=1), QuantConfig(2, 2))
    calibrate_(model, [(images, labels)])
    model.train()
    gradients = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=memory_format).zero_grad()
        nn.functional.cross_entropy(model(images.contiguous(memory_format=memory_format)), labels).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert len(gradients[0]) > 20_000
    torch.testing.assert_close(gradients[1], gradients[0], rtol=0, atol=1e-12 * float(gradients[0].abs().max()))
