"""Compiled vs eager training step on this machine: fp32 and QAT + knowledge distillation (ResNet-20).

    .venv/bin/python benchmarks/bench_compile.py [--repeats 15] [--batch 256] [--device cpu] [--tasks fp32 qat_kd]

``compile="auto"`` decides by this measurement whether the trainer compiles a step on the CPU: each
task runs ``cpq_lib.train.trainer.compiled_step`` eager and compiled (inductor's default mode; on CUDA
``reduce-overhead``), forward, backward and SGD, on the same batch. The QAT+KD student has 4-bit
weights and activations with learnable (LSQ) step sizes, the fp32 network as teacher (alpha 0.3, T 4),
as refinement trains it. Variants alternate step by step after warm-up (compilation happens there);
ratios are medians over rounds of compiled / eager.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, resnet20, save, time_alternating  # noqa: E402

from cpq_lib.quant import QuantConfig, calibrate_, quantize_  # noqa: E402
from cpq_lib.train import Distillation  # noqa: E402
from cpq_lib.train.trainer import compiled_step, cross_entropy  # noqa: E402


def stepper(model: torch.nn.Module, objective, mode: str | None, images: torch.Tensor, labels: torch.Tensor):
    forward = compiled_step(objective, model, mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cuda = images.device.type == "cuda"

    def run():
        loss, _ = forward(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", nargs="+", default=["fp32", "qat_kd"], choices=["fp32", "qat_kd"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, 32, 32, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,), generator=generator).to(device)
    teacher = resnet20().float().to(device).to(memory_format=torch.channels_last)
    student = quantize_(copy.deepcopy(teacher), QuantConfig(weight_bits=4, act_bits=4, learnable_scales=True))
    calibrate_(student.eval(), [(images, labels)], device)
    distill = Distillation(teacher, 0.3, 4.0)
    variants, compile_seconds = {}, {}
    tasks = [t for t in (("fp32", teacher, cross_entropy()), ("qat_kd", student, distill)) if t[0] in args.tasks]
    for name, model, objective in tasks:
        for compiled in (False, True):
            key = f"{name}_{'compiled' if compiled else 'eager'}"
            run = stepper(copy.deepcopy(model).train(), objective, mode if compiled else None, images, labels)
            started = time.perf_counter()
            run()  # the first call compiles
            compile_seconds[key] = time.perf_counter() - started
            variants[key] = run
    times = time_alternating(variants, args.repeats)
    result = {"batch": args.batch, "repeats": args.repeats, "device": str(device), "mode": mode, "machine": machine(),
              "first_step_seconds": compile_seconds, "step_seconds": {k: median(v) for k, v in times.items()},
              "compiled_vs_eager": {task: paired_ratio(times, f"{task}_compiled", f"{task}_eager") for task in args.tasks}}
    save("bench_compile", result)
    for task in args.tasks:
        print(f"{task:>6} step (batch {args.batch}): eager {result['step_seconds'][f'{task}_eager'] * 1e3:.1f} ms, compiled "
              f"{result['step_seconds'][f'{task}_compiled'] * 1e3:.1f} ms (first call {compile_seconds[f'{task}_compiled']:.0f} s), "
              f"compiled/eager {result['compiled_vs_eager'][task]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
