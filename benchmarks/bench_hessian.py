"""What the Hessian-aware allocators' traces cost, against one validation pass of the same model.

    .venv/bin/python benchmarks/bench_hessian.py --data-root ../shared/data/cifar10-jpeg.zip [--repeats 3]

The shipped ResNet-20 quantized as a search sees it (W8 until a plan is set, A2, MSE scales), its
``SearchEvaluator`` with the default 512 class-balanced training images for BatchNorm re-estimation,
which are also the images the traces are taken on. Timed: ``hawq``'s trace estimate (Hutchinson, one
Rademacher probe per Hessian-vector product over all 512 images, until every layer's running mean
moves by less than 1% or 200 probes), ``hawq_class``'s (one estimate per class on its own images), and
one validation pass of the float model over the 5,000 validation images (the cost unit). Alternating
rounds; ratios are medians of per-round ratios; probes and Hessian-vector products are recorded.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, resnet20, save, time_alternating  # noqa: E402

from cpq_lib.allocation import SearchEvaluator  # noqa: E402
from cpq_lib.allocation.hawq import class_traces, hessian_traces  # noqa: E402
from cpq_lib.data import load_dataset  # noqa: E402
from cpq_lib.quant import QuantConfig, calibrate_, quantize_  # noqa: E402
from cpq_lib.train import evaluate  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-probes", type=int, default=200)
    parser.add_argument("--val-images", type=int, default=None, help="validation images of the cost unit (default: all)")
    parser.add_argument("--trace-images", type=int, default=512, help="training images the traces are taken on")
    args = parser.parse_args(argv)
    bundle = load_dataset("cifar10", args.data_root)
    data = bundle.for_search()
    fp32 = resnet20()
    student = quantize_(copy.deepcopy(fp32), QuantConfig(weight_bits=8, act_bits=2, weight_init="mse", act_init="mse")).eval()
    calibrate_(student, data.calibration_loader(512))
    evaluator = SearchEvaluator(student, data, 100, bn_images=args.trace_images)
    val = bundle if args.val_images is None else dataclasses.replace(bundle, val=bundle.val.subset(range(args.val_images)))
    loader = val.eval_loader("val")
    found = {}

    def plain():
        found["hawq"] = hessian_traces(evaluator, args.max_probes, 1e-2, 0)

    def per_class():
        found["hawq_class"] = list(class_traces(evaluator, args.max_probes, 1e-2, 0).values())

    def validation():
        evaluate(fp32, loader, bundle.num_classes, "cpu")

    times = time_alternating({"validation pass": validation, "hawq traces": plain, "hawq_class traces": per_class},
                             args.repeats, warmup=0)
    estimates = {"hawq": [found["hawq"]], "hawq_class": found["hawq_class"]}
    result = {"machine": machine(), "repeats": args.repeats, "trace_images": evaluator.bn_images,
              "validation_images": len(val.val), "seconds": {k: median(v) for k, v in times.items()},
              "ratio_vs_validation_pass": {k: paired_ratio(times, f"{k} traces", "validation pass") for k in estimates},
              "cost": {k: {"estimates": len(e), "probes": sum(x.probes for x in e),
                           "hessian_vector_products": sum(x.hessian_vector_products for x in e),
                           "converged": all(x.converged for x in e)} for k, e in estimates.items()}}
    path = save("bench_hessian", result)
    for k in estimates:
        print(f"{k} traces: {result['seconds'][f'{k} traces']:.1f} s ({result['cost'][k]['hessian_vector_products']} "
              f"Hessian-vector products), {result['ratio_vs_validation_pass'][k]:.1f}x one validation pass "
              f"({result['seconds']['validation pass']:.1f} s, {len(val.val)} images)")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
