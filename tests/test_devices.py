"""One device rule: functions never move a caller's model; a mismatch is an error naming both devices.
A model on the "meta" device stands in for a CUDA model on this CPU-only machine."""

import pytest
import torch

from cpq_lib.classpath import score_classes
from cpq_lib.data import TensorBatchLoader
from cpq_lib.devices import DeviceError, check_model_device, same_device
from cpq_lib.models import build_model
from cpq_lib.quant import QuantConfig, calibrate_, quantize_
from cpq_lib.train import evaluate, train_model


@pytest.fixture()
def elsewhere():
    return build_model("digits_cnn", 10, in_channels=1).to("meta")


def test_every_model_consumer_refuses_a_model_on_another_device(elsewhere, digits):
    loader = TensorBatchLoader(digits.val, 16)
    message = r"the model is on meta but device='cpu' was requested; move it first"
    with pytest.raises(DeviceError, match="evaluate: " + message):
        evaluate(elsewhere, loader, 10, "cpu")
    with pytest.raises(DeviceError, match="score_classes: " + message):
        score_classes(elsewhere, loader, 10, device="cpu", progress=False)
    with pytest.raises(DeviceError, match="calibrate_: " + message):
        calibrate_(quantize_(elsewhere, QuantConfig(4, 4)), loader, "cpu")
    from cpq_lib.config import make_config

    with pytest.raises(DeviceError, match="train_model: " + message):
        train_model(elsewhere, digits, make_config("quick").train, seed=0, device="cpu", progress=False)
    assert next(elsewhere.parameters()).device.type == "meta"  # nothing was moved


def test_device_names():
    assert same_device(torch.device("cuda", 1), torch.device("cuda"))
    assert not same_device(torch.device("cuda", 0), torch.device("cuda", 1))
    assert not same_device(torch.device("cpu"), torch.device("cuda"))
    model = torch.nn.Linear(2, 2)
    assert check_model_device(model, "cpu", "here") == torch.device("cpu")
    assert check_model_device(torch.nn.ReLU(), "cuda", "here") == torch.device("cuda")  # nothing to check


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_cuda_request_with_a_cpu_model_names_both(digits):
    with pytest.raises(DeviceError, match="model is on cpu but device='cuda'"):
        evaluate(build_model("digits_cnn", 10, in_channels=1), TensorBatchLoader(digits.val, 16), 10, "cuda")
