"""PTQ-SL on ResNet-20 (W4A4, 8x2 blocks, reordered) vs one validation pass of the quantized model.

    .venv/bin/python benchmarks/bench_ptq.py --data-root ../shared/data/cifar10-jpeg.zip [--repeats 3]

"PTQ-SL" is the whole post-training procedure after ``quantize_``: channel reordering, activation
calibration and the scale search (cosine metric, 101 + 1 candidates, 2 rounds, 1,024 sampled output
positions per layer) on 512 training images. The validation pass evaluates the quantized model on the
5,000 validation images (batch 500). Variants alternate; the ratio is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, resnet20, save, time_alternating  # noqa: E402

from cpq_lib.data import load_dataset  # noqa: E402
from cpq_lib.ptq import ScaleSearchConfig, reorder_channels_, search_scales_  # noqa: E402
from cpq_lib.quant import QuantConfig, calibrate_, quantize_  # noqa: E402
from cpq_lib.train import evaluate  # noqa: E402


def _loader(images):
    from cpq_lib.data.loaders import TensorBatchLoader

    return TensorBatchLoader(images, 500)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--val-images", type=int, default=None, help="a stratified subset of the validation split (default: all)")
    args = parser.parse_args(argv)
    data = load_dataset("cifar10", args.data_root)
    model = resnet20()
    calibration = list(data.calibration_loader(args.calibration_images, seed=0))
    config = QuantConfig(weight_bits=4, act_bits=4, granularity="block", blocks=(8, 2))
    search = ScaleSearchConfig(positions=args.positions, steps=args.steps)
    quantized = calibrate_(quantize_(copy.deepcopy(model), config).eval(), calibration)
    validation = data.eval_loader("val") if args.val_images is None else _loader(data.subset("val", args.val_images))

    def ptq_sl():
        fresh = quantize_(copy.deepcopy(model), config).eval()
        reorder_channels_(fresh, "index_sort")
        calibrate_(fresh, calibration)
        search_scales_(fresh, model, calibration, search, progress=False)

    def validation_pass():
        evaluate(quantized, validation, data.num_classes)

    times = time_alternating({"validation pass": validation_pass, "PTQ-SL": ptq_sl}, args.repeats, warmup=1)
    seconds = {name: median(values) for name, values in times.items()}
    result = {"seconds": seconds, "ptqsl_vs_validation_pass": paired_ratio(times, "PTQ-SL", "validation pass"),
              "validation_images": sum(len(labels) for _, labels in validation), "calibration_images": args.calibration_images,
              "search": search.__dict__, "repeats": args.repeats, "times": times, "machine": machine()}
    save("bench_ptq", result)
    print(f"validation pass {seconds['validation pass']:.2f} s, PTQ-SL {seconds['PTQ-SL']:.1f} s: "
          f"ratio {result['ptqsl_vs_validation_pass']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
