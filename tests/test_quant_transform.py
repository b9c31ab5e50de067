"""The transform on four architectures, including depthwise convolutions, and its options."""

import copy
import warnings

import pytest
import torch
import torchvision
import torch.nn.functional as F
from torch import nn

from cpq_lib.models import build_model
from cpq_lib.quant import (
    BitPlan, LayerBits, QConv2d, QLinear, QuantConfig, QuantizedLayer, calibrate_, dequantize_, excluded_names, fold_batchnorm_,
    quantizable_layers, quantize_,
    quantized_layers,
)

# model name -> (builder, expected quantized layers with the default exclusions)
MODELS = {
    "digits_cnn": (lambda: build_model("digits_cnn", 10, in_channels=1), 2),
    "resnet20": (lambda: build_model("resnet20", 10), 18),
    "vgg_small": (lambda: build_model("vgg_small", 10), 5),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 51),
}


def _images(name, digits, cifar10):
    """(images to warm batch norm with, images to compare outputs on): real training images."""
    data = digits if name == "digits_cnn" else cifar10
    return data.train.images[:256].float() / 255, data.train.images[256:320].float() / 255


def _warm_up_batchnorm(model, images):
    """Give BN real running statistics so an untrained model behaves like a trained one in eval mode."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model(images)
    return model.eval()


def _cosine(a, b):
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_layer_replaced_and_8_bit_is_close_to_float(name, digits, cifar10):
    build, expected = MODELS[name]
    torch.manual_seed(0)
    calibration, inputs = _images(name, digits, cifar10)
    model = _warm_up_batchnorm(build(), calibration)
    all_layers = quantizable_layers(model)
    quantized = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=8, act_bits=8))
    layers = quantized_layers(quantized)
    assert len(layers) == expected == len(all_layers) - len(excluded_names(model, QuantConfig().exclude))
    assert {n for n, _ in all_layers} == {n for n, _ in quantizable_layers(quantized)}
    # calibrated on the compared images: the check isolates 8-bit rounding from clipping of unseen
    # outliers, which an untrained network (random weights, warmed-up BN) has plenty of
    calibrate_(quantized, [(inputs, None)])

    # operator level: every quantized layer, fed the float model's own input, matches its float twin
    float_inputs = {}
    floats = dict(all_layers)
    hooks = [floats[n].register_forward_pre_hook(lambda m, a, n=n: float_inputs.__setitem__(n, a[0])) for n, _ in layers]
    with torch.no_grad():
        reference = model(inputs)
        for handle in hooks:
            handle.remove()
        for layer_name, layer in layers:
            x = float_inputs[layer_name]
            assert _cosine(layer(x), floats[layer_name](x)) > 0.999, layer_name
        output = quantized(inputs)
    if name == "mobilenet_v2":
        # A randomly initialised 53-layer MobileNetV2 with batch norm is chaotic: a single depthwise
        # layer at 8 bits already moves the logits to cosine ~0.97 (measured), so end to end we only
        # require the operator-level check above and a sane output.
        assert torch.isfinite(output).all() and _cosine(output, reference) > 0.5
        assert any(layer.groups == layer.in_channels > 1 for _, layer in layers if isinstance(layer, QConv2d))
    else:
        assert _cosine(output, reference) > 0.999, f"{name}: cosine similarity {_cosine(output, reference):.5f}"


def test_exclusion_patterns_and_tokens():
    model = build_model("resnet20", 10)
    assert excluded_names(model, ["@first", "@last"]) == {"conv1", "fc"}
    assert excluded_names(model, ["*shortcut*"]) == {"layer2.0.shortcut.0", "layer3.0.shortcut.0"}
    quantize_(model, QuantConfig(exclude=()))
    assert len(quantized_layers(model)) == 22
    with pytest.raises(ValueError, match="unknown exclude token '@middle'"):
        excluded_names(model, ["@middle"])


@pytest.mark.parametrize("kwargs,message", [
    ({"weight_bits": 17}, "weight_bits"), ({"act_bits": -1}, "act_bits"), ({"granularity": "row"}, "granularity"),
    ({"granularity": "block"}, "blocks"), ({"weight_init": "percentile"}, "weight_init"),
])
def test_bad_quant_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_quantized_weights_are_cached_in_eval_and_invalidated_on_change():
    torch.manual_seed(0)
    model = quantize_(build_model("digits_cnn", 10, in_channels=1), QuantConfig(4, 4)).eval()
    layer = dict(quantized_layers(model))["features.0.0"]
    calls = []
    original = layer.weight_quantizer.forward
    layer.weight_quantizer.forward = lambda w: calls.append(1) or original(w)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        first = model(x)
        model(x)
        assert len(calls) == 1
        layer.weight.mul_(0.5)  # as an optimizer step or load_state_dict would
        second = model(x)
        assert len(calls) == 2 and not torch.equal(first, second)
        layer.weight_quantizer.set_bits(2, layer.weight)
        model(x)
        assert len(calls) == 3
    model.train()
    model(x)
    model(x)
    assert len(calls) == 5  # training always recomputes (the weight needs its gradient)


def test_training_step_updates_weights_and_scales():
    torch.manual_seed(0)
    model = quantize_(build_model("digits_cnn", 10, in_channels=1), QuantConfig(4, 4, learnable_scales=True))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    layer = dict(quantized_layers(model))["features.0.0"]
    before = (layer.weight.detach().clone(), layer.weight_quantizer.scale.detach().clone())
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert not torch.equal(before[0], layer.weight) and not torch.equal(before[1], layer.weight_quantizer.scale)


@pytest.mark.parametrize("model_dtype", [torch.float64, torch.float32])
def test_quantizer_scales_take_the_layers_precision_not_the_default(model_dtype):
    """A float64 model quantized under the float32 default keeps float64 scales (it learned them in
    float32 before)."""
    assert torch.get_default_dtype() == torch.float32
    model = quantize_(build_model("digits_cnn", 10, in_channels=1).to(model_dtype),
                      QuantConfig(2, 2, learnable_scales=True))
    expected = model_dtype
    scales = {name: tensor.dtype for name, tensor in [*model.named_parameters(), *model.named_buffers()]
              if name.endswith("quantizer.scale")}
    assert len(scales) == 4 and set(scales.values()) == {expected}, scales
    x = torch.rand(4, 1, 8, 8, dtype=model_dtype)
    calibrate_(model, [(x, None)])
    assert {t.dtype for name, t in model.named_parameters() if name.endswith("quantizer.scale")} == {expected}


def test_batchnorm_folding_preserves_the_function(cifar10):
    torch.manual_seed(0)
    images = cifar10.train.images[:32].float() / 255
    model = _warm_up_batchnorm(build_model("resnet20", 10), images)
    reference = model(images).detach()
    folded = fold_batchnorm_(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(images), reference, atol=1e-4, rtol=1e-4)
    quantized = quantize_(copy.deepcopy(model), QuantConfig(8, None, fold_bn=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in quantized.modules())
    assert all(layer.bias is not None for _, layer in quantized_layers(quantized))


def test_dequantize_bakes_quantized_weights_into_float_layers():
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    quantized = quantize_(model, QuantConfig(weight_bits=3, act_bits=None))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = quantized(x)
        plain = dequantize_(quantized)
        assert not quantized_layers(plain) and type(plain.layer1[0].conv1) is nn.Conv2d
        assert torch.equal(plain(x), expected)
    codes = plain.layer1[0].conv1.weight.reshape(16, -1)
    assert all(row.unique().numel() <= 7 for row in codes)  # 3-bit signed grid: at most 7 levels


def test_inference_and_autograd_paths_agree_exactly():
    torch.manual_seed(0)
    model = quantize_(build_model("resnet20", 10), QuantConfig(weight_bits=4, act_bits=4)).eval()
    x = torch.rand(4, 3, 32, 32)
    calibrate_(model, [(x, None)])
    with torch.no_grad():
        inference = model(x)  # cached weights, one-pass activation kernel
    with_grad = model(x.clone().requires_grad_(True))  # autograd path (torch's fused kernel, fresh weights)
    assert torch.equal(inference, with_grad.detach())


class Attention(nn.Module):
    """nn.MultiheadAttention reads out_proj.weight directly; nn.TransformerEncoderLayer's inference fast
    path reads linear1/linear2 weights directly; a ViT-style MLP of plain Linears is called normally."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.block = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x = self.block(x + self.mlp(x))
        return self.head(x.mean(1))


def test_layers_whose_weights_are_read_directly_stay_float_and_the_rest_is_quantized(tmp_path):
    from cpq_lib.quant import export_packed, import_packed, model_summary

    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(4, 5, 8)
    config = QuantConfig(weight_bits=2, act_bits=8, exclude=())
    quantized = quantize_(copy.deepcopy(model), config)
    names = {n for n, _ in quantized_layers(quantized)}
    assert names == {"embed", "mlp.0", "mlp.2", "head"}
    for float_child in (quantized.attention.out_proj, quantized.block.linear1, quantized.block.linear2,
                        quantized.block.self_attn.out_proj):
        assert not isinstance(float_child, (QConv2d, QLinear))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every quantized layer is reached by calibration
        calibrate_(quantized, [(x, None)])
    plan = BitPlan.from_model(quantized)
    assert set(plan.layers) == names
    with torch.no_grad():
        assert not torch.allclose(quantized(x), model(x), atol=1e-3)  # 2-bit layers really run
        half = copy.deepcopy(quantized)
        BitPlan({n: LayerBits([16] * len(b.weight), 8) for n, b in plan.layers.items()}).apply_(half)
        assert torch.allclose(half(x), model(x), atol=0.05)  # the float children compute what the float model does
    summary = model_summary(quantized, x)  # no KeyError: the float children count as float state
    assert summary["quantized_layers"] == 4
    path = tmp_path / "attention.cpq"
    export_packed(quantized, path)
    fresh = quantize_(copy.deepcopy(model), config)
    import_packed(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = self.a  # the same module under a second name
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_aliased_modules_share_one_quantized_twin():
    torch.manual_seed(0)
    model = quantize_(Shared(), QuantConfig(weight_bits=4, act_bits=None, exclude=("head",)))
    assert isinstance(model.a, QConv2d) and model.a is model.b
    assert [n for n, _ in quantized_layers(model)] == ["a"]


def test_boolean_bits_are_refused():
    with pytest.raises(ValueError, match="weight_bits.*boolean True"):
        QuantConfig(weight_bits=True)
    with pytest.raises(ValueError, match="act_bits.*boolean"):
        QuantConfig(act_bits=False)


class Branchy(nn.Module):
    """An auxiliary head used only in training (as in Inception): eval-mode calibration never reaches it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.main = nn.Linear(4, 2)
        self.aux = nn.Linear(4, 2)

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        return self.main(features) + (self.aux(features) if self.training else 0)


def test_calibration_names_layers_it_never_reached():
    model = quantize_(Branchy(), QuantConfig(weight_bits=8, act_bits=8, exclude=()))
    with pytest.warns(UserWarning, match=r"\['aux'\] were never called"):
        calibrate_(model, [(torch.rand(2, 1, 6, 6), None)])
    assert bool(model.main.input_quantizer.initialized) and not bool(model.aux.input_quantizer.initialized)


# --- layers quantize_ must not change: subclasses with their own forward, the model as a layer, odd weights ---

class StdConv2d(nn.Conv2d):
    """timm's pattern: the weight is standardised in the forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """timm's pattern: TensorFlow "same" padding in the forward (the layer itself has padding 0)."""

    def forward(self, x):
        pad = max((self.kernel_size[0] - 1) * self.dilation[0] + 1 - self.stride[0], 0)
        return F.conv2d(F.pad(x, [pad // 2, pad - pad // 2] * 2), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TwoConvs(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = conv
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.conv(self.stem(x)))


@pytest.mark.parametrize("layer", [StdConv2d(4, 4, 3, padding=1), Conv2dSame(4, 4, 3)], ids=["StdConv2d", "Conv2dSame"])
def test_conv_subclasses_keep_their_own_forward(layer):
    torch.manual_seed(0)
    float_model = TwoConvs(layer).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = float_model(x)
    model = quantize_(copy.deepcopy(float_model), QuantConfig(weight_bits=16, act_bits=None, exclude=("stem", "head")))
    twin = model.conv
    assert isinstance(twin, QuantizedLayer) and isinstance(twin, type(layer)) and type(twin) is not type(layer)
    with torch.no_grad():
        out = model(x)
    assert out.shape == reference.shape and _cosine(out, reference) > 0.99999  # was 0.759, and 7x7 instead of 8x8
    # at 3 bits the subclass computes with the fake-quantized weight and input
    low = quantize_(copy.deepcopy(float_model), QuantConfig(weight_bits=3, act_bits=4, exclude=("stem", "head")))
    calibrate_(low, [(x, None)])
    with torch.no_grad():
        inner = low.stem(x)
        manual = copy.deepcopy(layer)
        manual.weight.copy_(low.conv.weight_quantizer(low.conv.weight))
        expected = low.head(manual(low.conv.input_quantizer(inner)))
        assert torch.equal(low(x), expected)
    assert set(low.conv.state_dict()) == {"weight", "bias", *(f"weight_quantizer.{k}" for k in low.conv.weight_quantizer.state_dict()),
                                          *(f"input_quantizer.{k}" for k in low.conv.input_quantizer.state_dict())}
    # the original is untouched, and dequantize_ gives the subclass back with the quantized weight baked in
    assert type(float_model.conv) is type(layer) and not hasattr(float_model.conv, "weight_quantizer")
    plain = dequantize_(copy.deepcopy(low))
    assert type(plain.conv) is type(layer) and not isinstance(plain.conv, QuantizedLayer)
    assert torch.equal(plain.conv.weight, low.conv.weight_quantizer(low.conv.weight))
    # gradients reach the subclass's weight through the straight-through estimator
    low.train()
    low(x).sum().backward()
    assert low.conv.weight.grad is not None and low.conv.weight.grad.abs().sum() > 0


def test_a_model_that_is_itself_a_layer_is_refused():
    layer = nn.Linear(16, 4)
    with pytest.raises(ValueError, match=r"the model is itself a Linear; wrap it first, e.g. quantize_\(nn.Sequential"):
        quantize_(layer, QuantConfig(exclude=()))
    assert not list(layer.children()) and type(layer) is nn.Linear  # no child named '' any more
    wrapped = quantize_(nn.Sequential(layer), QuantConfig(exclude=()))
    assert [name for name, _ in quantized_layers(wrapped)] == ["0"]


def test_odd_models_get_clear_errors_and_stay_unchanged():
    from torch.nn.utils import parametrizations

    def model_with(second):
        return nn.Sequential(nn.Conv2d(3, 4, 3), second)

    normed = nn.Sequential(nn.Conv2d(3, 4, 3), parametrizations.weight_norm(nn.Conv2d(4, 4, 3)), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match=r"layer '1' \(ParametrizedConv2d\) computes its weight.*remove_parametrizations"):
        quantize_(normed, QuantConfig(exclude=()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based weight_norm is deprecated, and still used
        old_style = nn.Sequential(nn.Conv2d(3, 4, 3), torch.nn.utils.weight_norm(nn.Conv2d(4, 4, 3)))
    with pytest.raises(ValueError, match=r"layer '1' \(Conv2d\) computes its weight"):
        quantize_(old_style, QuantConfig(exclude=()))
    half = model_with(nn.Conv2d(4, 4, 3)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"layer '0' has bfloat16 weights; quantize_ needs float32 or float64 \(model.float\(\) first"):
        quantize_(half, QuantConfig(exclude=()))
    assert not quantized_layers(half)
    broken = model_with(nn.Conv2d(4, 4, 3))
    with torch.no_grad():
        broken[1].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '1' has 1 non-finite weight\(s\)"):
        quantize_(broken, QuantConfig(exclude=()))
    assert not quantized_layers(broken)
    with pytest.warns(UserWarning, match="has no Conv2d or Linear layer; nothing was quantized"):
        quantize_(nn.Sequential(nn.ReLU(), nn.Flatten()), QuantConfig())  # used to be "unknown exclude token '@first'"
