"""What BatchNorm re-estimation costs a search: one evaluation of a plan with and without it.

    .venv/bin/python benchmarks/bench_search_bn.py --data-root ../shared/data/cifar10-jpeg.zip [--repeats 5]

The shipped ResNet-20, quantized (W8 until a plan is set, A2, MSE scales, calibrated on 512 training
images), evaluated by ``SearchEvaluator`` on 1,000 validation images (the ``cifar10`` profile's search
subset) for a fixed mixed plan (per-channel 1..4 bits, seeded) that changes between calls (two plans
alternate, so every call re-sets the bits as a search does). Variants: ``bn_images=512`` (the default)
vs ``bn_images=0`` (the reference's stale statistics). Alternating rounds; the ratio is the median of
per-round ratios.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, resnet20, save, time_alternating  # noqa: E402

from cpq_lib.allocation import SearchEvaluator  # noqa: E402
from cpq_lib.data import load_dataset  # noqa: E402
from cpq_lib.quant import QuantConfig, calibrate_, quantize_  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args(argv)
    data = load_dataset("cifar10", args.data_root).for_search()
    student = quantize_(copy.deepcopy(resnet20()), QuantConfig(weight_bits=8, act_bits=2, weight_init="mse", act_init="mse")).eval()
    calibrate_(student, data.calibration_loader(512))
    evaluators = {"BN re-estimated (512 images)": SearchEvaluator(copy.deepcopy(student), data, args.images, bn_images=512),
                  "stale BN": SearchEvaluator(copy.deepcopy(student), data, args.images, bn_images=0)}
    generator = torch.Generator().manual_seed(0)
    size = evaluators["stale BN"].space.size
    plans = [torch.randint(1, 5, (size,), generator=generator) for _ in range(2)]
    calls = {name: 0 for name in evaluators}

    def runner(name):
        def run():
            evaluators[name].evaluate(plans[calls[name] % 2])
            calls[name] += 1
        return run

    times = time_alternating({name: runner(name) for name in evaluators}, args.repeats, warmup=1)
    ratio = paired_ratio(times, "BN re-estimated (512 images)", "stale BN")
    result = {"machine": machine(), "images": args.images, "repeats": args.repeats,
              "seconds": {name: median(values) for name, values in times.items()}, "times": times,
              "ratio_bn_vs_stale": ratio}
    path = save("bench_search_bn", result)
    print(f"evaluation of {args.images} images: BN re-estimated {result['seconds']['BN re-estimated (512 images)']:.2f} s, "
          f"stale {result['seconds']['stale BN']:.2f} s, ratio {ratio:.2f} ({path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
