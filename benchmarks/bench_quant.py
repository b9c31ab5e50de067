"""Quantized vs fp32 ResNet-20: eval time and train-step time ratios (batch 256, same memory format).

    .venv/bin/python benchmarks/bench_quant.py [--repeats 21] [--batch 256]

The quantized model has mixed per-channel weight bits 2..8 (seeded) and 4-bit activations; both
models are channels_last. ``quantized`` has calibrated, fixed scales; ``quantized_lsq`` the same
network with learnable (LSQ) step sizes, as refinement trains it. Variants alternate call by call in
one process; the reported ratio is the median over rounds of the per-round ratio (medians of the
times are recorded too).
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
from cpq_lib.quant import BitPlan, QuantConfig, calibrate_, quantize_  # noqa: E402


def build(batch: int, seed: int = 0, learnable: bool = False):
    torch.manual_seed(seed)
    fp32 = build_model("resnet20", 10).to(memory_format=torch.channels_last)
    quantized = quantize_(copy.deepcopy(fp32), QuantConfig(weight_bits=8, act_bits=4, learnable_scales=learnable))
    plan = BitPlan.from_model(quantized)
    generator = torch.Generator().manual_seed(seed)
    for bits in plan.layers.values():
        bits.weight = torch.randint(2, 9, (len(bits.weight),), generator=generator).tolist()
    plan.apply_(quantized)
    images = torch.rand(batch, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    calibrate_(quantized, [(images, labels)])
    return fp32, quantized.to(memory_format=torch.channels_last), images, labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    fp32, quantized, images, labels = build(args.batch)
    quantized_lsq = build(args.batch, learnable=True)[1]

    def evaluator(model):
        model.eval()

        def run():
            with torch.no_grad():
                model(images)
        return run

    eval_times = time_alternating({"fp32": evaluator(fp32), "quantized": evaluator(quantized)}, args.repeats)

    def stepper(model):
        model = copy.deepcopy(model).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run():
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    train_times = time_alternating({"fp32": stepper(fp32), "quantized": stepper(quantized),
                                    "quantized_lsq": stepper(quantized_lsq)}, args.repeats)
    result = {
        "batch": args.batch, "repeats": args.repeats, "machine": machine(),
        "eval_seconds": {k: median(v) for k, v in eval_times.items()},
        "train_step_seconds": {k: median(v) for k, v in train_times.items()},
    }
    result["eval_ratio"] = paired_ratio(eval_times, "quantized", "fp32")
    result["train_step_ratio"] = paired_ratio(train_times, "quantized", "fp32")
    result["train_step_ratio_lsq"] = paired_ratio(train_times, "quantized_lsq", "fp32")
    save("bench_quant", result)
    print(f"eval (no grad, batch {args.batch}):   fp32 {result['eval_seconds']['fp32'] * 1e3:.1f} ms, "
          f"quantized {result['eval_seconds']['quantized'] * 1e3:.1f} ms, ratio {result['eval_ratio']:.3f}")
    print(f"train step (batch {args.batch}):     fp32 {result['train_step_seconds']['fp32'] * 1e3:.1f} ms, "
          f"quantized {result['train_step_seconds']['quantized'] * 1e3:.1f} ms, ratio {result['train_step_ratio']:.3f}; "
          f"learnable scales {result['train_step_seconds']['quantized_lsq'] * 1e3:.1f} ms, "
          f"ratio {result['train_step_ratio_lsq']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
