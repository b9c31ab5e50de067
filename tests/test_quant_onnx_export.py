"""ONNX export: the QDQ graph ONNX Runtime runs gives cpq's predictions; what it cannot express is refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (a dependency; missing here)")
pytest.importorskip("onnxruntime", reason="verification needs onnxruntime (a dependency; missing here)")

from cpq_lib.models import load_pretrained  # noqa: E402
from cpq_lib.quant import BitPlan, QuantConfig, calibrate_, export_packed, quantize_, quantized_layers  # noqa: E402
from cpq_lib.quant.export import read_packed, unpack_codes  # noqa: E402
from cpq_lib.quant.onnx_export import OnnxExportError, export_onnx, verify_onnx  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def float32_precision():
    """The exported graphs compute in float32, as the cifar10 and paper profiles do."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


def _images(count: int, seed: int, size: int = 32) -> list[tuple[torch.Tensor, None]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(count, 3, size, size, generator=generator), None) for _ in range(2)]


def _quantized(model: nn.Module, config: QuantConfig, plan_seed: int | None = None, size: int = 32) -> nn.Module:
    model = quantize_(copy.deepcopy(model).eval(), config)
    if plan_seed is not None:  # a mixed per-channel plan: 2..6 bits with some channels pruned (0 bits)
        plan = BitPlan.from_model(model)
        generator = torch.Generator().manual_seed(plan_seed)
        for bits in plan.layers.values():
            choice = torch.tensor([0, 2, 3, 4, 5, 6])[torch.randint(0, 6, (len(bits.weight),), generator=generator)]
            bits.weight = choice.tolist()
        plan.apply_(model)
    calibrate_(model, _images(32, 1, size))
    return model.eval()


def _check(model: nn.Module, tmp_path, size: int = 32, relative: float = 1e-4) -> dict:
    path = export_onnx(model, torch.rand(2, 3, size, size), tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    report = verify_onnx(path, model, _images(16, 2, size))
    assert report["inputs"] == 32
    assert report["median_relative_difference"] < relative and report["top1_agreement"] >= 0.99, report
    optimized = verify_onnx(path, model, _images(16, 2, size), optimize=True)
    assert optimized["optimized"] and optimized["top1_agreement"] >= 0.9, optimized
    return report


@pytest.fixture(scope="module")
def resnet20():
    model, _ = load_pretrained("resnet20", "cifar10")
    return model.float().eval()


@pytest.mark.parametrize("config,plan_seed", [
    (QuantConfig(weight_bits=4, act_bits=4), None),
    (QuantConfig(weight_bits=4, act_bits=8), 0),
    (QuantConfig(weight_bits=4, act_bits=2), None),
    (QuantConfig(weight_bits=4, act_bits=4, symmetric=False), None),
    (QuantConfig(weight_bits=4, act_bits=4, granularity="block", blocks=(4, 1)), None),
    (QuantConfig(weight_bits=4, act_bits=4, granularity="block", blocks=(8, 2)), 1),
    (QuantConfig(weight_bits=4, act_bits=4, granularity="block", blocks=(4, 3), symmetric=False), None),
], ids=["W4A4", "mixed-A8", "W4A2", "asymmetric", "4x1-blocks", "8x2-blocks-mixed", "4x3-blocks-asymmetric"])
def test_shipped_resnet20_runs_in_onnx_runtime_with_cpq_predictions(resnet20, config, plan_seed, tmp_path):
    _check(_quantized(resnet20, config, plan_seed), tmp_path)


def test_the_graph_holds_cpq_codes_as_integers(resnet20, tmp_path):
    model = _quantized(resnet20, QuantConfig(weight_bits=4, act_bits=4), plan_seed=3)
    path = export_onnx(model, torch.rand(1, 3, 32, 32), tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    export_packed(model, tmp_path / "m.cpq")
    arrays, _ = read_packed(tmp_path / "m.cpq")
    for name, layer in quantized_layers(model):
        codes = initializers[f"{name}.weight_quantized"]
        assert codes.dtype == np.int8 and f"{name}.weight" not in initializers
        q = layer.weight_quantizer
        packed = unpack_codes(arrays[f"{name}:codes"], q.bits, layer.weight[0].numel(), q.symmetric)
        assert np.array_equal(codes.reshape(len(codes), -1), packed.numpy().astype(np.int8)), name
        assert (codes[q.bits.numpy() == 0] == 0).all()  # pruned channels are zeros
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") == ops.count("Clip") == len(quantized_layers(model))


@pytest.mark.parametrize("builder", [lambda: torchvision.models.mobilenet_v2(num_classes=10),
                                     lambda: torchvision.models.resnet18(num_classes=10)],
                         ids=["mobilenet_v2", "resnet18"])
def test_torchvision_models_with_random_weights(builder, tmp_path):
    """Weights alone: the graph computes cpq's numbers up to float noise. With activations, a value that
    float noise moves across a rounding boundary becomes one step different; an untrained ResNet-18
    (small, nearly equal logits, about a million activations per image) turns those steps into a median
    logit difference of about 1e-3 of the largest logit (measured 1.2e-3), so its bound is looser."""
    torch.manual_seed(0)
    model = builder().eval()
    weights_only = _check(_quantized(model, QuantConfig(weight_bits=6, act_bits=None), size=64), tmp_path, size=64)
    assert weights_only["median_relative_difference"] < 1e-5, weights_only
    _check(_quantized(model, QuantConfig(weight_bits=6, act_bits=8), size=64), tmp_path, size=64, relative=5e-3)


def test_what_onnx_cannot_express_is_refused_and_nothing_is_written(resnet20, tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(OnnxExportError, match="has no quantized layer: quantize_ it first"):
        export_onnx(copy.deepcopy(resnet20), torch.rand(1, 3, 32, 32), path)
    with pytest.raises(OnnxExportError, match=r"layer '.*' has weights of up to 9 bits.*allowed: 0..8"):
        export_onnx(_quantized(resnet20, QuantConfig(weight_bits=9, act_bits=8)), torch.rand(1, 3, 32, 32), path)
    with pytest.raises(OnnxExportError, match=r"quantizes its input to 12 bits"):
        export_onnx(_quantized(resnet20, QuantConfig(weight_bits=4, act_bits=12)), torch.rand(1, 3, 32, 32), path)
    from cpq_lib.ptq import reorder_channels_

    blocked = _quantized(resnet20, QuantConfig(weight_bits=4, act_bits=4, granularity="block", blocks=(4, 2)))
    reorder_channels_(blocked, "index_sort")  # regrouped columns: no blocked form expresses them
    with pytest.raises(OnnxExportError, match=r"layer '.*': the 4x2 layout's column groups are not 2 equal contiguous runs"):
        export_onnx(blocked, torch.rand(1, 3, 32, 32), path)
    assert list(tmp_path.iterdir()) == []
