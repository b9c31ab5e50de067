"""cpq's quantized ResNet-20 against the same network quantized with Brevitas, and against fp32.

    .venv/bin/pip install -r benchmarks/requirements-peers.txt    # Brevitas (a benchmark extra)
    .venv/bin/python benchmarks/bench_peers.py [--repeats 15] [--batch 256]

One network (cpq's ResNet-20, channels_last), the layers cpq quantizes by default (every conv but the
stem; the classifier stays float) quantized at W4A4 both ways: 4-bit per-output-channel weights and
4-bit per-tensor unsigned activations at each quantized layer's input.
- ``cpq``: ``quantize_`` with calibrated, fixed scales; ``cpq_lsq``: learnable (LSQ) step sizes, as
  refinement trains it.
- ``brevitas``: ``QuantConv2d`` with ``Int8WeightPerChannelFloat`` / ``Uint8ActPerTensorFloat`` at
  bit width 4 (Brevitas's stock quantizers: weight scales from statistics each step, activation scales
  learned after 30 steps of running statistics, which run before timing).
Train step (forward, cross-entropy, backward, SGD) and eval (no grad) alternate variant by variant in
one process; ratios are medians over rounds of variant / fp32.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, save, time_alternating  # noqa: E402

from cpq_lib.models import build_model  # noqa: E402
from cpq_lib.quant import QuantConfig, calibrate_, quantize_  # noqa: E402

BREVITAS_STATS_STEPS = 30  # Brevitas's default collect_stats_steps for runtime-statistics activation scales


def brevitas_twin(fp32: nn.Module, quantized_names: set[str]) -> nn.Module:
    """``fp32`` with the named convolutions replaced by Brevitas W4A4 ones holding the same weights."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    model = copy.deepcopy(fp32)
    for name in quantized_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        twin = qnn.QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                               padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                               bias=conv.bias is not None, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=4,
                               input_quant=Uint8ActPerTensorFloat, input_bit_width=4)
        twin.weight.data.copy_(conv.weight.data)
        if conv.bias is not None:
            twin.bias.data.copy_(conv.bias.data)
        setattr(parent, child, twin)
    return model.to(memory_format=torch.channels_last)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        import brevitas
    except ImportError:
        print("bench_peers: Brevitas is not installed; `.venv/bin/pip install -r benchmarks/requirements-peers.txt`")
        return 2
    torch.manual_seed(0)
    fp32 = build_model("resnet20", 10).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,), generator=generator)
    models = {"fp32": fp32}
    for name, learnable in (("cpq", False), ("cpq_lsq", True)):
        student = quantize_(copy.deepcopy(fp32), QuantConfig(weight_bits=4, act_bits=4, learnable_scales=learnable))
        models[name] = calibrate_(student.eval(), [(images, labels)]).to(memory_format=torch.channels_last)
    names = {n for n, m in models["cpq"].named_modules() if hasattr(m, "weight_quantizer")}
    models["brevitas"] = brevitas_twin(fp32, names)

    def stepper(model):
        model = copy.deepcopy(model).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run():
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run, model

    steps, trained = {}, {}
    for name, model in models.items():
        steps[name], trained[name] = stepper(model)
    small = images[:16]
    trained["brevitas"].train()
    for _ in range(BREVITAS_STATS_STEPS + 1):  # past the statistics phase: learned activation scales from here
        trained["brevitas"](small)

    def evaluator(model):
        def run():
            with torch.no_grad():
                model(images)
        return run

    train_times = time_alternating(steps, args.repeats)
    eval_times = time_alternating({name: evaluator(model.eval()) for name, model in trained.items()}, args.repeats)
    peers = [name for name in models if name != "fp32"]
    result = {"batch": args.batch, "repeats": args.repeats, "machine": machine(), "brevitas": brevitas.__version__,
              "train_step_seconds": {k: median(v) for k, v in train_times.items()},
              "eval_seconds": {k: median(v) for k, v in eval_times.items()},
              "train_step_ratio": {k: paired_ratio(train_times, k, "fp32") for k in peers},
              "eval_ratio": {k: paired_ratio(eval_times, k, "fp32") for k in peers}}
    save("bench_peers", result)
    for k in models:
        train_ratio = "" if k == "fp32" else f" ({result['train_step_ratio'][k]:.2f}x fp32)"
        eval_ratio = "" if k == "fp32" else f" ({result['eval_ratio'][k]:.2f}x fp32)"
        print(f"{k:>9}: train step {result['train_step_seconds'][k] * 1e3:6.1f} ms{train_ratio}, "
              f"eval {result['eval_seconds'][k] * 1e3:6.1f} ms{eval_ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
