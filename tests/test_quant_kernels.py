import pytest
import torch

from cpq_lib.quant import kernels
from cpq_lib.quant.primitives import fake_quantize_per_tensor, integer_range, integer_range_int


def test_python_integer_range_matches_tensor_version():
    for signed in (True, False):
        for bits in range(17):
            low, high = integer_range(bits, signed)
            assert integer_range_int(bits, signed) == (int(low), int(high))


@pytest.fixture()
def fresh_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "_disabled", False)
    monkeypatch.delenv("CPQ_COMPILE", raising=False)


@pytest.mark.parametrize("shape,channels_last,zero_point,qmin,qmax", [
    ((8, 16, 12, 12), True, 0, 0, 15), ((8, 16, 12, 12), False, 0, -7, 7), ((5, 33), False, 3, 0, 255),
])
def test_inference_kernel_is_bit_identical_to_torch(fresh_kernels, shape, channels_last, zero_point, qmin, qmax):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale = torch.tensor(0.0731)
    zp = torch.tensor(zero_point, dtype=torch.int32)
    expected = fake_quantize_per_tensor(x, scale, zp, qmin, qmax)
    arguments = kernels.inference_arguments(scale, zp, qmin, qmax)
    compiled = kernels.FAKE_QUANTIZE.calls["compiled"]
    out = kernels.fake_quantize_inference(x, arguments, lambda: pytest.fail("fell back"))
    assert torch.equal(out, expected) and out.stride() == x.stride()
    assert kernels.FAKE_QUANTIZE.calls["compiled"] == compiled + 1


def test_switch_off_and_fallback_on_failure(fresh_kernels, monkeypatch):
    x = torch.rand(4, 3)
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    monkeypatch.setenv("CPQ_COMPILE", "0")
    arguments = kernels.inference_arguments(scale, zp, 0, 15)
    assert kernels.fake_quantize_inference(x, arguments, lambda: "torch kernel") == "torch kernel"
    monkeypatch.delenv("CPQ_COMPILE")

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels.FAKE_QUANTIZE, "compiled", broken)
    eager = kernels.FAKE_QUANTIZE.calls["eager"]
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert kernels.fake_quantize_inference(x, arguments, lambda: "torch kernel") == "torch kernel"
    assert not kernels.compiled_kernels_enabled() and kernels.FAKE_QUANTIZE.calls["eager"] == eager + 1


@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_reductions_match_eager(fresh_kernels, channels_last):
    generator = torch.Generator().manual_seed(0)
    a, g = torch.randn(2, 6, 4, 5, 5, generator=generator).unbind(0)
    a = torch.relu(a)  # exact zeros, as after ReLU
    if channels_last:
        a, g = a.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    fused = (kernels.TAYLOR_MAX, kernels.MEAN_ABS, kernels.TAYLOR_ACTIVE)
    before = [dict(kernel.calls) for kernel in fused]
    assert torch.equal(kernels.taylor_max(a, g), (a * g).abs().flatten(2).amax(2))
    assert torch.allclose(kernels.mean_abs(g), g.abs().flatten(2).mean(2))
    active = kernels.taylor_active(a, g, 0.05)
    assert torch.equal(active, ((a * g).abs() > 0.05).float()) and active.stride() == a.stride()
    # the compiled kernels ran (a silent fall-back to eager would pass the comparisons above)
    for kernel, calls in zip(fused, before):
        assert kernel.calls == {"compiled": calls["compiled"] + 1, "eager": calls["eager"]}
    flat = torch.randn(3, 7, generator=generator)
    assert torch.equal(kernels.taylor_max(flat, flat), flat * flat)


def test_quantized_inference_runs_the_compiled_kernel(fresh_kernels):
    from cpq_lib.models import build_model
    from cpq_lib.quant import QuantConfig, calibrate_, quantize_

    torch.manual_seed(0)
    model = quantize_(build_model("digits_cnn", 10, in_channels=1), QuantConfig(4, 4)).eval()
    x = torch.rand(8, 1, 8, 8)
    calibrate_(model, [(x, None)])
    before = dict(kernels.FAKE_QUANTIZE.calls)
    with torch.no_grad():
        model(x)
    assert kernels.FAKE_QUANTIZE.calls["compiled"] == before["compiled"] + 2  # one per quantized layer's input
    assert kernels.FAKE_QUANTIZE.calls["eager"] == before["eager"]


def test_first_compile_logs_no_cuda_home_warning():
    """CPU-only machines with CUDA wheels: the compile path must not print torch's CUDA_HOME warning."""
    import subprocess
    import sys

    code = ("import torch\nfrom cpq_lib.quant import kernels\n"
            "out = kernels.mean_abs(torch.ones(2, 3, 4, 4))\nassert out.shape == (2, 3), out.shape\nprint('ok')")
    env = {k: v for k, v in __import__("os").environ.items() if k != "CPQ_COMPILE"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
    assert "CUDA_HOME" not in result.stderr, result.stderr[-2000:]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (so -0.0 and +0.0 differ), in a layout-independent order."""
    return t.detach().contiguous().view(torch.int32)


def _input(shape, channels_last: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator) * 3
    x.view(-1)[:7] = 0.0  # exact zeros, as after ReLU
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last,zero_point,qmin,qmax", [(True, 0, 0, 15), (False, 0, -7, 7), (True, 5, 0, 255)])
def test_training_kernel_matches_torch_values_and_gradient(fresh_kernels, channels_last, zero_point, qmin, qmax):
    x0 = _input((6, 16, 10, 10), channels_last)
    upstream = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    scale, zp = torch.tensor(0.0731), torch.tensor(zero_point, dtype=torch.int32)
    results = []
    for fused in (False, True):
        x = x0.clone().requires_grad_()
        reference = lambda: fake_quantize_per_tensor(x, scale, zp, qmin, qmax)  # noqa: E731
        out = (kernels.fake_quantize_training(x, kernels.inference_arguments(scale, zp, qmin, qmax),
                                              lambda: pytest.fail("fell back")) if fused else reference())
        out.backward(upstream)
        results.append((out, x.grad))
    (expected, expected_grad), (out, grad) = results
    assert torch.equal(_bits(out), _bits(expected)) and torch.equal(_bits(grad), _bits(expected_grad))
    assert out.stride() == x0.stride() and grad.stride() == x0.stride()
    assert 0 < int((grad == 0).sum()) < grad.numel()  # the range clips some inputs: the mask is exercised


@pytest.mark.parametrize("qmin,qmax", [(-8, 7), (-1, 1), (0, 15)])
def test_learned_step_kernel_matches_the_generic_function(fresh_kernels, qmin, qmax):
    from cpq_lib.quant.primitives import fake_quantize, lsq_grad_factor

    x0 = _input((6, 16, 10, 10), True)
    upstream = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    factor = lsq_grad_factor(16 * 10 * 10, qmax)
    results = []
    for fused in (False, True):
        x, scale = x0.clone().requires_grad_(), torch.tensor(0.37, requires_grad=True)
        generic = lambda: fake_quantize(x, scale, None, qmin, qmax, None, factor)  # noqa: E731
        out = kernels.learned_step_training(x, scale, qmin, qmax, factor, generic) if fused else generic()
        out.backward(upstream)
        results.append((out, x.grad, scale.grad))
    (expected, expected_x, expected_s), (out, grad_x, grad_s) = results
    assert torch.equal(out, expected) and torch.equal(_bits(grad_x), _bits(expected_x))
    assert torch.equal(_bits(grad_s), _bits(expected_s)) and float(grad_s) != 0.0
    if qmin < 0:  # signed grids: no clamp at zero, so even the zeros' signs agree
        assert torch.equal(_bits(out), _bits(expected))
    assert kernels.LSQ_GRADIENTS.calls["compiled"] >= 1


def test_training_kernels_fall_back_where_they_do_not_apply(fresh_kernels, monkeypatch):
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    arguments = kernels.inference_arguments(scale, zp, 0, 15)
    double = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    assert kernels.fake_quantize_training(double, arguments, lambda: "torch kernel") == "torch kernel"
    assert kernels.learned_step_training(double, torch.tensor(0.1), 0, 15, 1.0, lambda: "generic") == "generic"
    assert kernels.learned_step_training(torch.rand(4, 3), torch.ones(3, 1), 0, 15, 1.0, lambda: "generic") == "generic"
    monkeypatch.setenv("CPQ_COMPILE", "0")
    assert kernels.fake_quantize_training(torch.rand(4, 3), arguments, lambda: "torch kernel") == "torch kernel"
